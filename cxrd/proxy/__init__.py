"""The WSS proxy: cxrd's second child process group (DESIGN §8).

``python -m cxrd.proxy`` runs it; :mod:`cxrd.proxy.launch` builds its
ChildSpec for the supervisor; :mod:`cxrd.proxy.certs` makes and checks its
certificate. Nothing here imports the supervisor, D-Bus or sd_notify.
"""
