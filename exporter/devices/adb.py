"""adb:SERIAL: an Android phone or emulator, reached with the Android Debug Bridge.

Runners and artifacts go to ``/data/local/tmp/recgpt/`` (the one place a non-rooted phone
lets a shell user write and execute); the runner's line protocol rides ``adb shell -T``
(no pseudo-terminal, so the logits' bytes pass unchanged). Every adb command is logged at
debug level (``--debug``) as it is run. An artifact pushed for a run is removed after it.

Android's libc is bionic: the manylinux (glibc) runtimes the emulator and ssh devices use do
not load there. ``device setup adb:SERIAL --runners DIR`` therefore installs runners built
for Android (the NDK against ExecuTorch's Android libraries) from a folder laid out as
``DIR/<target>/<runner>``; script runners (ONNX) need a Python, which a phone has not.
"""

from __future__ import annotations

import atexit
import logging
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from exporter.devices.base import Device, DeviceInfo, RunResult
from exporter.errors import StageError, UsageError

KIND = "adb"
REMOTE_ROOT = "/data/local/tmp/recgpt"
log = logging.getLogger(__name__)


def parse_serial(spec: str) -> str:
    match = re.fullmatch(r"adb:([A-Za-z0-9._:\-]+)", spec)
    if not match:
        raise UsageError(f"device {spec!r} is not of the form adb:SERIAL", hint="`adb devices` lists the serials")
    return match.group(1)


def state_problem(serial: str, returncode: int, stdout: str, stderr: str) -> str | None:
    """What ``adb -s SERIAL get-state`` says is wrong with the device, or None when it is ready."""
    state = stdout.strip()
    if returncode == 0 and state == "device":
        return None
    text = (stderr.strip().splitlines() or [state or f"exit {returncode}"])[-1].removeprefix("error: ")
    if "not found" in text:
        return f"no device {serial!r} is attached (adb: {text})"
    if "offline" in (state, text) or "offline" in text:
        return f"device {serial!r} is offline"
    if "unauthorized" in text or state == "unauthorized":
        return f"device {serial!r} has not authorised this computer (accept the prompt on the phone)"
    return f"device {serial!r} is not ready: {text or state}"


class AdbDevice(Device):
    kind = KIND

    def __init__(self, spec: str, *, adb: str = "adb") -> None:
        self.serial = parse_serial(spec)
        self.adb = adb
        self._pushed: list[str] = []
        self._info: DeviceInfo | None = None

    @property
    def spec(self) -> str:
        return f"adb:{self.serial}"

    def command(self, *args: str) -> list[str]:
        """The host command line for ``adb -s SERIAL args...``."""
        return [self.adb, "-s", self.serial, *args]

    def shell_command(self, argv: Sequence[str]) -> list[str]:
        return self.command("shell", "-T", shlex.join(argv))

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        if shutil.which(self.adb) is None:
            raise UsageError(f"{self.adb} is not installed",
                             hint="install the Android platform tools (Debian: apt-get install adb)")
        log.debug("adb: %s", shlex.join(command))
        return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=600)

    def check_ready(self) -> None:
        proc = self._run(self.command("get-state"))
        problem = state_problem(self.serial, proc.returncode, proc.stdout, proc.stderr)
        if problem:
            raise UsageError(problem, hint="`adb devices` lists what is attached; reconnect or start the emulator")

    def _checked(self, command: list[str], what: str) -> str:
        proc = self._run(command)
        if proc.returncode != 0:
            self.check_ready()  # a device that went away says so in its own words
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or
                    [f"exit {proc.returncode}"])[-1]
            raise StageError(f"{self.spec}: {what} failed: {tail}", stage="device run")
        return proc.stdout

    def describe(self) -> DeviceInfo:
        if self._info is None:
            self.check_ready()
            out = self._checked(self.shell_command(["sh", "-c", "uname -m; getconf _NPROCESSORS_ONLN; "
                                                    "grep -m1 -E '^(flags|Features)' /proc/cpuinfo; "
                                                    "getprop ro.product.model"]), "describing the device")
            lines = out.splitlines() + ["", "", "", ""]
            from exporter.devices.host import kernel_features

            model = lines[3].strip()
            self._info = DeviceInfo(kind=KIND, name=f"{self.spec}" + (f" ({model})" if model else ""),
                                    arch=lines[0].strip(), cpu_count=int(lines[1] or 1),
                                    features=kernel_features(lines[2]))
        return self._info

    def push(self, local: Path) -> Path:
        remote = f"{REMOTE_ROOT}/artifacts/{Path(local).name}"
        self._checked(self.shell_command(["rm", "-rf", remote]), "clearing the artifact folder")
        self._checked(self.shell_command(["mkdir", "-p", remote]), "making the artifact folder")
        if not self._pushed:
            atexit.register(self.cleanup)
        self._pushed.append(remote)
        self._checked(self.command("push", *[str(p) for p in sorted(Path(local).iterdir())], remote + "/"),
                      "adb push")
        return Path(remote)

    def cleanup(self) -> None:
        while self._pushed:
            self._checked(self.shell_command(["rm", "-rf", self._pushed.pop()]), "removing the pushed artifact")

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> RunResult:
        proc = self._run(self.shell_command(argv))
        return RunResult(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)

    def spawn(self, argv: Sequence[str], *, stderr: IO[bytes]) -> subprocess.Popen:
        command = self.shell_command(argv)
        log.debug("adb: %s", shlex.join(command))
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)

    def pull(self, remote: Path, local: Path) -> Path:
        self._checked(self.command("pull", str(remote), str(local)), "adb pull")
        return Path(local)

    def python(self) -> list[str] | None:
        return None

    def interpreter(self) -> list[str] | None:
        return None  # Android has no Python: script runners are refused by name

    def native_runner(self, target: str) -> Path | None:
        from exporter.backends import backend_class

        spec = backend_class(target).native_runner
        if spec is None or spec.interpreted:
            return None
        binary = f"{REMOTE_ROOT}/runners/{target}/{spec.name}"
        found = self._run(self.shell_command(["test", "-x", binary]))
        return Path(binary) if found.returncode == 0 else None

    def file_sha256(self, path: Path) -> str:
        return self._checked(self.shell_command(["sha256sum", str(path)]), "hashing the runner").split()[0]


def setup(spec: str, runners: Path | None, *, progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Copy Android builds of the backends' runners (``runners/<target>/``) to the device."""
    from exporter.backends import backend_class, known_targets

    device = AdbDevice(spec)
    info = device.describe()
    progress(f"{device.spec}: {info.arch}, {info.cpu_count} cores")
    if runners is None:
        raise UsageError(f"{device.spec}: Android runs bionic, not the glibc runtimes this tool can build here",
                         hint="build the runners with the Android NDK and pass their folder: "
                              f"`recgpt-export device setup {device.spec} --runners DIR` (DIR/<target>/<runner>)")
    installed = {}
    for target in known_targets():
        runner = backend_class(target).native_runner
        source = Path(runners) / target
        if runner is None or runner.interpreted or not (source / runner.name).is_file():
            continue
        remote = f"{REMOTE_ROOT}/runners/{target}"
        device._checked(device.shell_command(["rm", "-rf", remote]), "clearing the runner folder")
        device._checked(device.shell_command(["mkdir", "-p", remote]), "making the runner folder")
        device._checked(device.command("push", *[str(p) for p in sorted(source.iterdir())], remote + "/"), "adb push")
        device._checked(device.shell_command(["chmod", "755", f"{remote}/{runner.name}"]), "chmod")
        installed[target] = remote
        progress(f"{target}: {runner.name} installed at {remote}")
    if not installed:
        raise UsageError(f"{runners} holds no runner (expected <target>/<runner>, e.g. executorch/et_runner)")
    return {"device": device.spec, "arch": info.arch, "runners": installed}
