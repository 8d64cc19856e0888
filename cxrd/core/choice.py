"""What an application asks the runtime to run with, over the config. Pure: no I/O.

A client's ``Start``/``Restart`` may carry ``device_profile``, ``env`` (keys of
an isaacteleop env file) and ``gpu`` (the CUDA index). A :class:`Choice` is
such a request; the supervisor keeps the one the runtime was started with as
an overlay on the config, so a reload that changes other settings keeps it.
A request matches the runtime when every key it names has the value the
runtime runs with; the keys it does not name are not compared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from cxrd import constants as C
from cxrd.config import Config, check_device_profile, same_profile
from cxrd.core.model import ENV_NAME, check_env_value
from cxrd.errors import ConfigMismatch, CxrdError, InvalidArgs, ProfileMismatch

# Keys a request's env may not hold, and what to do instead.
_NOT_IN_ENV = {
    C.DEVICE_PROFILE_ENV: "pass it as device_profile",
    C.GPU_CUDA_ENV: "pass it as gpu",
    C.SERVER_PORT_ENV: "the runtime's ports are the daemon's (its runtime.signaling_port)",
    C.MEDIA_PORT_ENV: "the runtime's ports are the daemon's (its runtime.media_port)",
}


@dataclass(frozen=True)
class Choice:
    profile: str | None = None  # NV_DEVICE_PROFILE
    env: Mapping[str, str] = field(default_factory=dict)  # over runtime.env
    gpu: int | None = None  # NV_CXR_GPU_INDEX_CUDA, over runtime.gpu

    @property
    def empty(self) -> bool:
        return self.profile is None and not self.env and self.gpu is None

    @classmethod
    def from_env(cls, values: Mapping[str, str]) -> Choice:
        """An isaacteleop env file's keys as a request: its profile and GPU index lifted out."""
        env = dict(values)
        profile = env.pop(C.DEVICE_PROFILE_ENV, None)
        gpu_text = env.pop(C.GPU_CUDA_ENV, None)
        gpu = None
        if gpu_text is not None:
            try:
                gpu = int(gpu_text.strip())
            except ValueError:
                raise InvalidArgs(
                    f"{C.GPU_CUDA_ENV}: expected a CUDA device index, got {gpu_text!r}"
                ) from None
        return cls(profile=profile, env=env, gpu=gpu)

    def check(self) -> None:
        """InvalidArgs naming every key a daemon cannot take, all at once."""
        problems: list[str] = []
        if self.profile is not None:
            try:
                check_device_profile(self.profile)
            except InvalidArgs as exc:
                problems.append(str(exc))
        if self.gpu is not None and self.gpu < 0:
            problems.append(f"gpu {self.gpu}: a CUDA device index is 0 or more")
        for key, value in sorted(self.env.items()):
            if not ENV_NAME.match(key):
                problems.append(f"env {key!r}: not a valid environment variable name")
            elif key in C.RESERVED_ENV_KEYS:
                problems.append(f"env {key}: reserved, cxrd computes it from install_dir")
            elif key in _NOT_IN_ENV:
                problems.append(f"env {key}: {_NOT_IN_ENV[key]}")
            else:
                try:
                    check_env_value(key, value)
                except ValueError as exc:
                    problems.append(f"env {exc}")
        if self.gpu is not None and C.GPU_VULKAN_ENV in self.env:
            problems.append(
                f"env {C.GPU_VULKAN_ENV}: the runtime takes either it or gpu "
                f"({C.GPU_CUDA_ENV}), never both"
            )
        if problems:
            raise InvalidArgs("; ".join(problems))

    def over(self, base: Choice) -> Choice:
        """``base`` with every key this one names replaced."""
        return Choice(
            profile=self.profile if self.profile is not None else base.profile,
            env={**base.env, **self.env},
            gpu=self.gpu if self.gpu is not None else base.gpu,
        )

    def applied(self, config: Config) -> Config:
        """``config`` as the runtime runs it with this choice."""
        rt = config.runtime
        env = {**rt.env, **self.env}
        if self.gpu is not None:
            env.pop(C.GPU_VULKAN_ENV, None)  # one GPU index: the one asked for
        runtime = dataclasses.replace(
            rt,
            device_profile=self.profile if self.profile is not None else rt.device_profile,
            env=env,
            gpu=self.gpu if self.gpu is not None else rt.gpu,
        )
        return dataclasses.replace(config, runtime=runtime)

    def differences(self, running: Config) -> list[tuple[str, str, str]]:
        """(key, running value, requested value) for each key this asks otherwise."""
        rt = running.runtime
        env = {**C.DEFAULT_RUNTIME_ENV, **rt.env, C.DEVICE_PROFILE_ENV: rt.device_profile}
        if rt.gpu is not None:
            env[C.GPU_CUDA_ENV] = str(rt.gpu)
        return self.differences_in(env)

    def differences_in(self, env: Mapping[str, str]) -> list[tuple[str, str, str]]:
        """As :meth:`differences`, against a runtime's environment (its cloudxr.env)."""
        found: list[tuple[str, str, str]] = []
        profile = env.get(C.DEVICE_PROFILE_ENV)
        if self.profile is not None and not same_profile(self.profile, profile or ""):
            found.append(("device_profile", _shown(profile), self.profile))
        gpu = env.get(C.GPU_CUDA_ENV)
        if self.gpu is not None and gpu != str(self.gpu):
            found.append(("gpu", _shown(gpu), str(self.gpu)))
        for key in sorted(self.env):
            if env.get(key) != self.env[key]:
                found.append((key, _shown(env.get(key)), self.env[key]))
        return found

    def keeping(self, old: Config, new: Config) -> Choice:
        """This choice after a reload from ``old`` to ``new``: a setting the files changed wins."""
        profile_changed = new.runtime.device_profile != old.runtime.device_profile
        return Choice(
            profile=None if profile_changed else self.profile,
            env={
                k: v
                for k, v in self.env.items()
                if new.runtime.env.get(k) == old.runtime.env.get(k)
            },
            gpu=None if new.runtime.gpu != old.runtime.gpu else self.gpu,
        )

    def as_settings(self) -> dict[str, str]:
        """The keys chosen, for ``Status()``: ``device_profile``, ``gpu``, then env keys."""
        settings: dict[str, str] = {}
        if self.profile is not None:
            settings["device_profile"] = self.profile
        if self.gpu is not None:
            settings["gpu"] = str(self.gpu)
        settings.update(sorted(self.env.items()))
        return settings


def _shown(value: object) -> str:
    return "(unset)" if value is None else str(value)


def describe_mismatch(found: list[tuple[str, str, str]]) -> str:
    """Every differing key with both values."""
    return "; ".join(f"{key}: running {have!r}, requested {want!r}" for key, have, want in found)


def mismatch_error(found: list[tuple[str, str, str]], what: str) -> CxrdError:
    """ProfileMismatch when only the profile differs (what older clients expect), else
    ConfigMismatch; ``what`` says which runtime, the differences and the way out follow."""
    text = f"{what}: {describe_mismatch(found)}"
    if [key for key, _, _ in found] == ["device_profile"]:
        return ProfileMismatch(f"{text}; `cxrctl restart --profile P` switches it")
    return ConfigMismatch(
        f"{text}; `cxrctl restart --env-file FILE` (or --gpu, --profile) switches it"
    )
