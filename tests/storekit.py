"""Object-store servers on 127.0.0.1 for tests, started and stopped by pid: S3 (moto's server
mode, reached through s3fs) and Google Cloud Storage (gcp-storage-emulator, through gcsfs),
each configured exactly as a run reaches a real bucket: through environment variables."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from runkit import free_port


@dataclass
class StoreServer:
    """A loopback object store: where it listens, its pid, and how a process reaches it."""

    endpoint: str
    pid: int
    protocol = ""  # the fsspec protocol it serves

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server through fsspec."""
        raise NotImplementedError

    def filesystem(self):
        raise NotImplementedError

    def upload_dir(self, local: Path, remote: str) -> None:
        """Copy every file of `local` to `remote` ("bucket/prefix"), creating the bucket if needed."""
        fs = self.filesystem()
        bucket = remote.split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for path in sorted(Path(local).iterdir()):
            if path.is_file():
                fs.put_file(str(path), f"{remote}/{path.name}")


class S3Server(StoreServer):
    protocol = "s3"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint})


class GcsServer(StoreServer):
    protocol = "gs"

    @property
    def env(self) -> dict[str, str]:
        """gcsfs goes to the emulator (anonymously); its bucket-type probe over gRPC stays off."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def filesystem(self):
        import gcsfs

        return gcsfs.GCSFileSystem(endpoint_url=self.endpoint, token="anon", skip_instance_cache=True)


def _serve(command: list[str], probe_path: str) -> tuple[str, subprocess.Popen]:
    """Start `command` (which takes the port last) on a free loopback port; wait until it answers."""
    port = free_port()
    proc = subprocess.Popen(command + [str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{endpoint}{probe_path}", timeout=1).close()
            return endpoint, proc
        except urllib.error.HTTPError:  # it answers, if only to say no
            return endpoint, proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{command[:3]} did not come up on 127.0.0.1")


def start_s3_server() -> tuple[S3Server, subprocess.Popen]:
    endpoint, proc = _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p"], "/moto-api/")
    return S3Server(endpoint, proc.pid), proc


def start_gcs_server() -> tuple[GcsServer, subprocess.Popen]:
    emulator = str(Path(sys.executable).parent / "gcp-storage-emulator")
    endpoint, proc = _serve([emulator, "start", "--host", "127.0.0.1", "--in-memory", "--port"], "/storage/v1/b")
    return GcsServer(endpoint, proc.pid), proc


def serving(start: Callable[[], tuple[StoreServer, subprocess.Popen]]) -> Iterator[StoreServer]:
    """A fixture body: the server `start` launches, stopped by pid afterwards."""
    server, proc = start()
    try:
        yield server
    finally:
        proc.kill()
        proc.wait()


def pointed_at(server: StoreServer, monkeypatch) -> Iterator[StoreServer]:
    """A fixture body: this test process reaches `server` (fsspec's cached filesystems of its
    protocol dropped before and after, so no client keeps another endpoint)."""
    import fsspec

    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem(server.protocol).clear_instance_cache()
    yield server
    fsspec.filesystem(server.protocol).clear_instance_cache()
