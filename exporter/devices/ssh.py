"""ssh://[user@]host[:port]: an ARM board, a farm machine or a Mac, reached with the system's ssh.

Files go over scp, commands run through ``ssh -o BatchMode=yes`` (keys only: a password
prompt would hang a CI job), and the native runner's line protocol rides the ssh session's
stdin and stdout. ``device setup ssh://...`` builds the backend's runner for the remote's
architecture (``uname -m``: the host's g++ for x86_64, the aarch64 cross build otherwise)
and copies it to ``~/.cache/recgpt-export/runners/`` there. An artifact pushed for a run goes
to a fresh remote folder and is removed after it.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from exporter.devices.base import Device, DeviceInfo, RunResult
from exporter.errors import StageError, UsageError

KIND = "ssh"
REMOTE_RUNNERS = ".cache/recgpt-export/runners"  # under the remote user's home


@dataclass(frozen=True)
class SshTarget:
    user: str | None
    host: str
    port: int

    @classmethod
    def parse(cls, spec: str) -> SshTarget:
        match = re.fullmatch(r"ssh://(?:([^@/:]+)@)?([^@/:]+)(?::(\d+))?/?", spec)
        if not match:
            raise UsageError(f"device {spec!r} is not of the form ssh://[user@]host[:port]")
        user, host, port = match.groups()
        return cls(user, host, int(port or 22))

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return f"ssh://{self.destination}" + (f":{self.port}" if self.port != 22 else "")


def ssh_options(target: SshTarget) -> list[str]:
    options = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", "-o", "ConnectTimeout=10"]
    key = os.environ.get("RECGPT_SSH_KEY")
    if key:
        options += ["-i", key]
    known_hosts = os.environ.get("RECGPT_SSH_KNOWN_HOSTS")
    if known_hosts:
        options += ["-o", f"UserKnownHostsFile={known_hosts}"]
    return options


class SshDevice(Device):
    kind = KIND

    def __init__(self, spec: str) -> None:
        self.target = SshTarget.parse(spec)
        self._pushed: list[str] = []
        self._info: DeviceInfo | None = None

    @property
    def spec(self) -> str:
        return str(self.target)

    def ssh_command(self, remote: str) -> list[str]:
        return ["ssh", *ssh_options(self.target), "-p", str(self.target.port), self.target.destination, remote]

    def _checked(self, remote: str) -> str:
        proc = subprocess.run(self.ssh_command(remote), capture_output=True, text=True, errors="replace")
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise UsageError(f"{self.target}: `{remote}` failed: {tail}",
                             hint="check that `ssh` to it works without a password (a key; RECGPT_SSH_KEY)")
        return proc.stdout

    def describe(self) -> DeviceInfo:
        if self._info is None:
            out = self._checked("uname -m; getconf _NPROCESSORS_ONLN; grep -m1 -E '^(flags|Features)' /proc/cpuinfo "
                                "|| true").splitlines()
            from exporter.devices.host import kernel_features

            self._info = DeviceInfo(kind=KIND, name=str(self.target), arch=out[0].strip(), cpu_count=int(out[1]),
                                    features=kernel_features("\n".join(out[2:])))
        return self._info

    def _scp(self, sources: Sequence[str], destination: str) -> None:
        command = ["scp", "-q", "-r", *ssh_options(self.target), "-P", str(self.target.port), *sources, destination]
        proc = subprocess.run(command, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise StageError(f"copying to or from {self.target} failed: {tail}", stage="device push")

    def push(self, local: Path) -> Path:
        remote = self._checked("mktemp -d /tmp/recgpt-artifact-XXXXXX").strip()
        if not self._pushed:
            atexit.register(self.cleanup)  # a failed or interrupted run leaves nothing there either
        self._pushed.append(remote)
        self._scp([str(p) for p in sorted(Path(local).iterdir())], f"{self.target.destination}:{remote}/")
        return Path(remote)

    def cleanup(self) -> None:
        """Remove what push() copied (the runners stay: they are the device's set-up)."""
        while self._pushed:
            self._checked(f"rm -rf {shlex.quote(self._pushed.pop())}")

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> RunResult:
        proc = subprocess.run(self.ssh_command(shlex.join(argv)), capture_output=True, text=True, errors="replace")
        return RunResult(returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)

    def spawn(self, argv: Sequence[str], *, stderr: IO[bytes]) -> subprocess.Popen:
        return subprocess.Popen(self.ssh_command(shlex.join(argv)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr)

    def pull(self, remote: Path, local: Path) -> Path:
        self._scp([f"{self.target.destination}:{remote}"], str(local))
        return Path(local)

    def python(self) -> list[str] | None:
        return None

    def interpreter(self) -> list[str] | None:
        return ["python3"]

    def python_version(self) -> str | None:
        """The remote python3's X.Y (script runners' wheels are built for it), or None."""
        proc = subprocess.run(self.ssh_command("python3 -c 'import sys; print(*sys.version_info[:2], sep=\".\")'"),
                              capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None

    def native_runner(self, target: str) -> Path | None:
        from exporter.backends import backend_class

        spec = backend_class(target).native_runner
        if spec is None:
            return None
        home = self._checked("printf %s \"$HOME\"")
        binary = Path(home) / REMOTE_RUNNERS / target / spec.name
        test = "-f" if spec.interpreted else "-x"  # a script runner is read by python3, not executed
        found = subprocess.run(self.ssh_command(f"test {test} {shlex.quote(str(binary))}"), capture_output=True)
        return binary if found.returncode == 0 else None

    def file_sha256(self, path: Path) -> str:
        return self._checked(f"sha256sum {shlex.quote(str(path))}").split()[0]


def setup(spec: str, *, progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Build each backend's native runner for the remote's architecture and copy it there."""
    from exporter.backends import backend_class, known_targets
    from exporter.devices.runner_build import build_device_runner, host_python_version

    device = SshDevice(spec)
    info = device.describe()
    progress(f"{device.target}: {info.arch}, {info.cpu_count} cores")
    built = {}
    with tempfile.TemporaryDirectory(prefix="recgpt-ssh-runners-") as scratch:
        for target in known_targets():
            runner = backend_class(target).native_runner
            if runner is None:
                continue
            out = Path(scratch) / target
            python_version = device.python_version() if runner.interpreted else host_python_version()
            if python_version is None:
                progress(f"{target}: skipped (its runner is a Python script and the device has no python3)")
                continue
            build_device_runner(runner, out, Path(scratch) / "downloads", progress, arch=info.arch,
                                python_version=python_version)
            remote = f"{REMOTE_RUNNERS}/{target}"
            device._checked(f"rm -rf {remote} && mkdir -p {remote}")
            device._scp([str(p) for p in sorted(out.iterdir())], f"{device.target.destination}:{remote}/")
            built[target] = remote
    progress(f"{device.target} set up (runners: {', '.join(built) or 'none'})")
    return {"device": str(device.target), "arch": info.arch, "runners": built}
