"""A child's start worker: prepare, spawn, await readiness, follow what it reports.

The one piece of :class:`~cxrd.core.runner.Runner` that runs outside the
queue's task: it writes only what it prepared for its own spawn (the proxy's
launch on its first start, the runtime's log offset) and reports every
outcome as a message, so whatever a port raises here is a named failure of
this child (``cxrd.core.faults``), never an exception nobody hears.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cxrd import constants as C
from cxrd.config import Config
from cxrd.core import commands as M
from cxrd.core.children import Child
from cxrd.core.faults import attempt, named_failure, quietly
from cxrd.core.model import ChildSpec, RuntimeLaunch, SessionEvent
from cxrd.core.ports import ChildHandle, Host, Launcher, ProxyLaunch, Readiness

log = logging.getLogger(__name__)


@dataclass
class _Recipe:
    spec: ChildSpec
    ready: Callable[[], Awaitable[None]]
    spawned: Callable[[], None]  # after spawn, whatever happened
    discard: Callable[[], None]  # once readiness and events are no longer awaited
    follow: Callable[[], Awaitable[SessionEvent | None]]  # after ready; None: no more


def _nothing() -> None:
    pass


async def _no_events() -> None:
    return None


class Starting:
    """The start worker of :class:`~cxrd.core.runner.Runner`, which provides these."""

    _config: Config
    _runtime: Child
    _launcher: Launcher
    _readiness: Readiness
    _host: Host
    _runtime_launch: RuntimeLaunch | None
    _proxy_launch: ProxyLaunch | None
    _stderr_offset: int
    _server_log: str
    _spawned_runtime: bool

    def _post(self, msg: M.Message) -> None:
        raise NotImplementedError

    def _worker_ended(self, child: Child, gen: int, _task: asyncio.Task[None]) -> None:
        """A worker cancelled before it spawned (perhaps before it ever ran) says so."""
        if child.reported < gen:
            child.reported = gen
            self._post(M.SpawnFailed(child, gen, None))

    async def _start_worker(self, child: Child, gen: int) -> None:
        """Prepare, spawn, await readiness; whatever a port raises is reported, never lost."""
        name = child.name
        try:
            recipe = await self._recipe(child)
        except Exception as exc:
            child.reported = gen
            self._post(M.SpawnFailed(child, gen, named_failure(f"cannot start the {name}", exc)))
            return
        child.spawning = True
        try:
            handle = await self._launcher.spawn(recipe.spec)
        except Exception as exc:
            quietly(f"closing the {name}'s ready pipe", recipe.discard, None)
            child.reported = gen
            self._post(M.SpawnFailed(child, gen, named_failure(f"cannot start the {name}", exc)))
            return
        finally:
            child.spawning = False
            quietly(f"closing the {name}'s end of its ready pipe", recipe.spawned, None)
        child.reported = gen
        self._post(M.Spawned(child, gen, handle))
        try:
            try:
                async with asyncio.timeout(self._config.runtime.startup_timeout):
                    await recipe.ready()
            except TimeoutError:
                self._post(M.TimedOut(child, gen))
                return
            except Exception as exc:
                doing = f"cannot tell whether the {name} is ready"
                self._post(M.TimedOut(child, gen, named_failure(doing, exc)))
                return
            self._post(M.Ready(child, gen))
            # The proxy goes on reporting headset sessions until its pipe closes.
            while (event := await recipe.follow()) is not None:
                self._post(M.Session(child, gen, event))
        except Exception as exc:
            log.warning("%s", named_failure(f"no more headset sessions from the {name}", exc))
        finally:
            quietly(f"closing the {name}'s ready pipe", recipe.discard, None)

    async def _recipe(self, child: Child) -> _Recipe:
        if child is self._runtime:
            launch = self._runtime_launch
            assert launch is not None
            run_dir = self._config.run_dir
            host = self._host
            removed = attempt(f"cannot claim {run_dir}", lambda: host.claim_run_dir(run_dir))
            if removed:
                log.info("removed stale %s from %s", ", ".join(removed), run_dir)
            env_file = run_dir / C.ENV_FILE
            attempt(
                f"cannot write {env_file}",
                lambda: host.publish_environment(run_dir, launch.environment),
            )
            self._stderr_offset = quietly(
                f"cannot read {launch.stderr_log}", lambda: host.log_size(launch.stderr_log), 0
            )
            self._server_log = ""
            self._spawned_runtime = True
            sentinel = run_dir / C.SENTINEL_FILE
            return _Recipe(
                launch.spec, lambda: self._readiness.file(sentinel), _nothing, _nothing, _no_events
            )
        if self._proxy_launch is None:
            self._proxy_launch = await self._host.prepare_proxy(self._config, keep=None)
        pipe = self._readiness.pipe()
        try:
            spec = self._proxy_launch.spec(pipe.write_fd)
        except BaseException:
            pipe.close()
            raise
        return _Recipe(spec, pipe.wait, pipe.close_write, pipe.close, pipe.next_event)

    async def _watch(self, child: Child, gen: int, handle: ChildHandle) -> None:
        try:
            code = await handle.wait()
        except Exception as exc:
            lost = named_failure(f"lost track of the {child.name} (pid {handle.pid})", exc)
            self._post(M.Exited(child, gen, None, str(lost)))
            return
        self._post(M.Exited(child, gen, code))
