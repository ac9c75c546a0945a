"""A real S3-protocol server on 127.0.0.1 for tests: moto's server mode, started and stopped by
pid, reached through s3fs exactly as a run reaches a real bucket (AWS_* environment variables)."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from runkit import free_port


@dataclass
class S3Server:
    endpoint: str
    pid: int

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to talk to this server through s3fs/botocore."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint})

    def upload_dir(self, local: Path, remote: str) -> None:
        """Copy every file of `local` to `remote` ("bucket/prefix"), creating the bucket if needed."""
        fs = self.filesystem()
        bucket = remote.split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for path in sorted(Path(local).iterdir()):
            if path.is_file():
                fs.put_file(str(path), f"{remote}/{path.name}")


def start_s3_server() -> tuple[S3Server, subprocess.Popen]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return S3Server(endpoint, proc.pid), proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto's S3 server did not come up on 127.0.0.1")
