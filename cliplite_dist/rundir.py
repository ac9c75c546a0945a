"""Run directories on remote storage: written locally, mirrored in the background.

A run whose `run.output_dir` is a URL (s3://, gs://, any fsspec protocol but file://) writes its
files to a local staging directory (`Config.run_dir`), and `RunDirSync` mirrors that directory to
`Config.run_url` from a daemon thread every `run.sync_every_s` seconds, with a last pass at exit.
Training never waits on the network: a failing store costs a logged retry, not the run.

Files outside checkpoints/ are copied whole whenever their size or mtime changed. A checkpoint is
uploaded only once it is complete here, and in an order that keeps the remote copy safe to read:
    checkpoints/step_N/    the data files first, then the markers:
        COMPLETE           rank 0's marker (step, `nodes N`), uploaded by node 0 after its files
        UPLOADED-node{k}   node k's files of step_N are all up
A remote checkpoint is complete when COMPLETE and UPLOADED-node0 .. node{N-1} are all there.
Markers also go first when a checkpoint is pruned or rewritten, before the files they vouch for.

Every rank writes its checkpoint files on its own node, so local rank 0 of every node runs a
sync. Node k > 0 never sees rank 0's COMPLETE in its own staging directory: it uploads a
checkpoint once COMPLETE is up remotely (rank 0 writes it only after every rank has saved), and
everything at its last pass (a save that died there has no COMPLETE anywhere, so node k's marker
vouches for nothing; the next start deletes it); and it drops the checkpoints rank 0 pruned.
Nodes that share one staging directory (run.local_dir on a shared filesystem) leave it to node 0,
which then marks their files too.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from pathlib import Path

import fsspec
import torch
import torch.distributed as dist

from cliplite_dist import checkpoint
from cliplite_dist.config import Config
from cliplite_dist.distributed import DistEnv, run_and_agree

CHECKPOINTS = "checkpoints"
NODE_MARKER = "UPLOADED-node"
_NODES = re.compile(r"^nodes (\d+)$", re.MULTILINE)  # the line checkpoint.save writes into COMPLETE

log = logging.getLogger("cliplite_dist")

Stat = tuple[int, int]  # (size, mtime_ns): a file counts as changed when either differs


class SyncError(RuntimeError):
    """The last upload of a run directory failed; its staging directory still holds every file."""


def _tag_of(rel: str) -> str | None:
    """The checkpoint a run-relative path belongs to, if any."""
    parts = rel.split("/")
    return parts[1] if parts[0] == CHECKPOINTS and len(parts) > 2 else None


def _stat(path: Path) -> Stat:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class RunDirSync:
    """Mirrors the staging directory `local` to `url`.

    `nodes`: the nodes whose checkpoint files `local` holds, and so whose markers this sync
    uploads: (k,) on node k, every node sharing the directory on node 0.
    """

    def __init__(self, local: Path, url: str, every_s: float, nodes: tuple[int, ...] = (0,)):
        self.local, self.url, self.every_s, self.nodes = Path(local), url, every_s, nodes
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self._sent: dict[str, Stat] = {}  # run-relative path -> its stat when it was uploaded
        self._marked: set[str] = set()  # checkpoints whose markers from here are up
        self._lock = threading.Lock()  # one pass (or pull) at a time: the thread's or a caller's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Adopt what the remote already holds (before the trainer opens its logs), then sync
        every `every_s` seconds in a daemon thread."""
        with self._lock:
            for rel in self._adopt_remote():
                self._remove(rel)
        self._thread = threading.Thread(target=self._loop, name="run-dir-sync", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sync_or_log()

    def sync_or_log(self) -> bool:
        """One pass; a failure is logged and left to the next pass, which retries what is missing."""
        try:
            self.sync()
            return True
        except Exception as exc:  # noqa: BLE001 - whatever the store raises, training goes on
            log.warning("syncing %s to %s failed, retrying in %g s: %s: %s", self.local, self.url,
                        self.every_s, type(exc).__name__, exc)
            return False

    def close(self) -> None:
        """Stop the thread and upload everything left; raises SyncError if that fails."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.sync(final=True)
        except Exception as exc:
            message = (f"the last sync of {self.local} to {self.url} failed ({type(exc).__name__}: {exc}); "
                       f"every file is still in {self.local}: copy it there, or rerun on this machine")
            log.error(message)
            raise SyncError(message) from exc

    # ---- one pass -----------------------------------------------------------------------------
    def sync(self, final: bool = False) -> None:
        """Upload what changed: checkpoints (once complete), remote removal of pruned ones, then
        the other files (`checkpoints/latest` after the checkpoint it names). Raises on the first
        failure; what was uploaded until then stays recorded. `final`: the run is over: a node
        without rank 0 marks its share of every checkpoint without waiting for COMPLETE."""
        with self._lock:
            tags, others = self._scan()
            remote_complete = set() if 0 in self.nodes or final else self._remote_with_complete()
            for tag in sorted(tags, key=checkpoint.step_of):
                self._sync_checkpoint(tag, tags[tag], final or tag in remote_complete)
            self._prune(set(tags), remote_complete)
            for rel, stat in others.items():
                if self._sent.get(rel) != stat:
                    self._upload(rel, stat)

    def _scan(self) -> tuple[dict[str, dict[str, Stat]], dict[str, Stat]]:
        """(checkpoint tag -> {path: stat}, other path -> stat), paths relative to the run; hidden
        names (temporary files, downloads in progress) are left out."""
        tags: dict[str, dict[str, Stat]] = {}
        others: dict[str, Stat] = {}
        for dirpath, dirnames, filenames in os.walk(self.local):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                try:
                    stat = _stat(path)
                except FileNotFoundError:  # removed meanwhile (a pruned checkpoint)
                    continue
                rel = path.relative_to(self.local).as_posix()
                tag = _tag_of(rel)
                if tag is None:
                    others[rel] = stat
                else:
                    tags.setdefault(tag, {})[rel] = stat
        return tags, others

    def _sync_checkpoint(self, tag: str, files: dict[str, Stat], complete_elsewhere: bool) -> None:
        """Data files, then COMPLETE (node 0), then this directory's node markers; nothing until the
        checkpoint is whole: COMPLETE here with no file newer than it (newer ones: a save of the
        same step is rewriting it), or, without node 0's files, `complete_elsewhere`."""
        complete_rel = f"{CHECKPOINTS}/{tag}/{checkpoint.COMPLETE}"
        complete = files.get(complete_rel)
        data = {rel: stat for rel, stat in files.items() if rel != complete_rel}
        changed = {rel: stat for rel, stat in data.items() if self._sent.get(rel) != stat}
        if tag in self._marked:
            if not changed:
                return
            self._unmark(tag)  # rewritten: it must stop counting as complete before its files change
        settled = complete is not None and all(mtime <= complete[1] for _, mtime in data.values())
        if not (settled or (0 not in self.nodes and complete_elsewhere)):
            return
        for rel, stat in changed.items():
            self._upload(rel, stat)
        if 0 in self.nodes:
            self._upload(complete_rel, complete)
        for node in self.nodes:
            self.fs.pipe_file(f"{self.root}/{CHECKPOINTS}/{tag}/{NODE_MARKER}{node}", b"")
        self._marked.add(tag)

    def _unmark(self, tag: str) -> None:
        """Delete this directory's remote markers of `tag`, COMPLETE first."""
        names = ([checkpoint.COMPLETE] if 0 in self.nodes else []) + [f"{NODE_MARKER}{n}" for n in self.nodes]
        for name in names:
            self._remove(f"{CHECKPOINTS}/{tag}/{name}")
        self._sent.pop(f"{CHECKPOINTS}/{tag}/{checkpoint.COMPLETE}", None)
        self._marked.discard(tag)

    def _prune(self, local_tags: set[str], remote_complete: set[str]) -> None:
        """Remote copies of checkpoints gone from here go too (markers first). Without node 0's
        files, a checkpoint that lost its remote COMPLETE while a newer one has it was pruned by
        rank 0: this node's copy, remote and local, goes as well."""
        uploaded = {tag for tag in map(_tag_of, self._sent) if tag} | self._marked
        for tag in uploaded - local_tags:
            self._remove_checkpoint(tag)
        if remote_complete:
            newest = max(remote_complete, key=checkpoint.step_of)
            for tag in self._marked - remote_complete:
                if checkpoint.step_of(tag) < checkpoint.step_of(newest):
                    self._remove_checkpoint(tag)
                    shutil.rmtree(self.local / CHECKPOINTS / tag, ignore_errors=True)

    def _remove_checkpoint(self, tag: str) -> None:
        self._unmark(tag)
        if 0 in self.nodes:  # the whole folder, other nodes' files included
            self._remove(f"{CHECKPOINTS}/{tag}", recursive=True)
        mine = [rel for rel in self._sent if _tag_of(rel) == tag]
        for rel in mine:
            if 0 not in self.nodes:
                self._remove(rel)
            del self._sent[rel]

    def _upload(self, rel: str, stat: Stat) -> None:
        """`stat` was taken before the upload: a file that grows meanwhile is sent again next pass."""
        try:
            self.fs.put_file(str(self.local / rel), f"{self.root}/{rel}")
        except FileNotFoundError:
            if (self.local / rel).exists():
                raise  # the remote side is missing (a bucket, say)
            return  # removed here meanwhile
        self._sent[rel] = stat

    def _remove(self, rel: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(f"{self.root}/{rel}", recursive=recursive)
        except FileNotFoundError:
            pass

    # ---- reading the remote -------------------------------------------------------------------
    def _remote_with_complete(self) -> set[str]:
        """Remote checkpoints that have COMPLETE (their node markers aside)."""
        self.fs.invalidate_cache()  # other nodes write there too
        return {path.rsplit("/", 2)[-2] for path in
                self.fs.glob(f"{self.root}/{CHECKPOINTS}/*/{checkpoint.COMPLETE}")}

    def _files_under(self, prefix: str) -> dict[str, dict]:
        """Remote files below `prefix` with their info. s3fs's find falls back to info(prefix)
        when its listing comes back empty, so another node's upload landing in between would
        list the prefix itself as a "directory": keep files only."""
        return {path: info for path, info in self.fs.find(prefix, detail=True).items() if info["type"] == "file"}

    def remote_complete(self) -> list[str]:
        """Complete remote checkpoints (COMPLETE and every node's marker), oldest first."""
        base = f"{self.root}/{CHECKPOINTS}"
        with_complete = self._remote_with_complete()
        markers: dict[str, set[str]] = {}
        for path in self.fs.glob(f"{base}/*/{NODE_MARKER}*"):
            tag, name = path.rsplit("/", 2)[-2:]
            markers.setdefault(tag, set()).add(name)
        complete = []
        for tag in sorted(with_complete, key=checkpoint.step_of):
            match = _NODES.search(self.fs.cat_file(f"{base}/{tag}/{checkpoint.COMPLETE}").decode())
            nodes = int(match.group(1)) if match else 1
            if all(f"{NODE_MARKER}{n}" in markers.get(tag, ()) for n in range(nodes)):
                complete.append(tag)
        return complete

    def _adopt_remote(self) -> list[str]:
        """Take in what the remote holds, so that a restart uploads only what changed and never
        replaces the remote's history with a shorter file: same-size files count as uploaded;
        files outside checkpoints/ that are missing or shorter here are downloaded (logs and
        metrics.jsonl grow by appending: the longer copy is the newer). Returns this directory's
        markers of checkpoints without COMPLETE (a save that died): stale, to be deleted before
        a later save of the same step could make them vouch for it."""
        listing = self._files_under(self.root)  # raises for a missing bucket
        with_complete = {_tag_of(path[len(self.root) + 1:]) for path in listing
                         if path.endswith("/" + checkpoint.COMPLETE)}
        mine = {f"{NODE_MARKER}{n}" for n in self.nodes}
        stale = []
        for path, info in listing.items():
            rel = path[len(self.root) + 1:]
            tag = _tag_of(rel)
            if rel.rsplit("/", 1)[-1] in mine and tag is not None:
                if tag not in with_complete:
                    stale.append(rel)
                elif (self.local / CHECKPOINTS / tag).is_dir():  # others are no business of this pass
                    self._marked.add(tag)
                continue
            local = self.local / rel
            size = local.stat().st_size if local.is_file() else -1
            if tag is None and size < info["size"]:
                local.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(local))
                size = info["size"]
            if size == info["size"]:
                self._sent[rel] = _stat(local)
        return stale

    def pull(self, tag: str | None = None) -> str | None:
        """Download remote checkpoint `tag`, or else the newest complete remote one if it is newer
        than every complete one here (the run went on elsewhere); returns the newest complete
        checkpoint here afterwards. Downloads go to a hidden folder, renamed once whole."""
        ckpt = self.local / CHECKPOINTS
        with self._lock:
            local = checkpoint.find_latest(ckpt)
            complete = self.remote_complete()
            if tag is not None and tag not in complete:
                raise FileNotFoundError(f"{self.url} has no complete checkpoint {tag} (complete: {complete})")
            remote = tag or (complete[-1] if complete else None)
            step_of = checkpoint.step_of
            if remote is None or (tag is None and local is not None and step_of(local) >= step_of(remote)):
                return local
            part = ckpt / f".pull-{remote}"
            shutil.rmtree(part, ignore_errors=True)
            prefix = f"{self.root}/{CHECKPOINTS}/{remote}"
            names = [path[len(prefix) + 1:] for path in self._files_under(prefix)]
            names = [n for n in names if not n.rsplit("/", 1)[-1].startswith(NODE_MARKER)]
            for name in sorted(names, key=lambda n: n == checkpoint.COMPLETE):  # COMPLETE last, as saved
                (part / name).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f"{prefix}/{name}", str(part / name))
            shutil.rmtree(ckpt / remote, ignore_errors=True)  # this node's share of the same save
            part.rename(ckpt / remote)
            for path in (ckpt / remote).rglob("*"):
                if path.is_file():
                    self._sent[path.relative_to(self.local).as_posix()] = _stat(path)
            self._marked.add(remote)
            (ckpt / checkpoint.LATEST).unlink(missing_ok=True)  # it names an older one: find_latest scans
            log.info("pulled checkpoint %s from %s", remote, self.url)
            return remote if tag else checkpoint.find_latest(ckpt)


# ---- the trainer's side: collectives over the nodes ---------------------------------------------
def _staging_nodes(run_dir: Path, env: DistEnv) -> tuple[int, ...]:
    """Collective: the nodes whose files this rank's sync covers; () where no sync runs (not
    local rank 0, or a node whose staging directory node 0 shares). Nodes find out which
    directories they share from probe files."""
    if env.num_nodes == 1:
        return (0,) if env.local_rank == 0 else ()
    leader = env.local_rank == 0
    if leader:  # probes a crashed start left behind go first
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".node*"):
            stale.unlink(missing_ok=True)
    dist.barrier()
    if leader:
        (run_dir / f".node{env.node}").touch()
    dist.barrier()
    seen = {k for k in range(env.num_nodes) if (run_dir / f".node{k}").exists()} if leader else set()
    dist.barrier()
    if not leader:
        return ()
    (run_dir / f".node{env.node}").unlink()
    if env.node == 0:
        return tuple(sorted(seen))
    return () if 0 in seen else (env.node,)


def start_sync(cfg: Config, env: DistEnv, device: torch.device) -> RunDirSync | None:
    """Collective, before anything is written to the run directory: for a remote run, start the
    syncs (see `_staging_nodes`); returns this rank's, or None."""
    if not cfg.run_url:
        return None
    nodes = _staging_nodes(cfg.run_dir, env)
    sync = RunDirSync(cfg.run_dir, cfg.run_url, cfg.run.sync_every_s, nodes) if nodes else None
    run_and_agree(sync and sync.start, device, f"reading {cfg.run_url}")
    return sync


def upload_now(sync: RunDirSync | None) -> None:
    """Collective: everything staged goes up now, checkpoints with every node's share: node 0's
    COMPLETE in the first round, the other nodes' shares and markers in the second (they mark a
    checkpoint only once it is complete remotely). A failed upload is logged; that checkpoint then
    does not count remotely, and a resume takes the newest one that does."""
    for _ in range(2):
        if sync is not None:
            sync.sync_or_log()
        dist.barrier()


def pull_for_resume(sync: RunDirSync | None, device: torch.device) -> None:
    """Collective, before resuming: every staging directory gets the newest complete remote
    checkpoint where it is newer than its own. The nodes must then agree on the newest one, or
    their ranks would resume from different steps."""
    upload_now(sync)  # what the last attempt saved but did not upload

    def pull() -> int:
        tag = sync.pull()
        return -1 if tag is None else checkpoint.step_of(tag)

    low, high = run_and_agree(sync and pull, device, "pulling the newest checkpoint")
    if low != high:
        raise RuntimeError(f"the nodes' newest checkpoints differ (steps {low} and {high}): one node holds a "
                           f"checkpoint that never reached {sync.url if sync else 'the remote run directory'}; "
                           f"remove it there (or use another run.local_dir) to resume from the remote one")


def fetch(url: str, dest: Path, tag: str | None = None) -> str:
    """A local copy of a remote run directory for tools that read one (cliplite-export): its files
    outside checkpoints/ and one complete checkpoint, `tag` or the newest; returns that tag."""
    sync = RunDirSync(dest, url, every_s=0)
    sync._adopt_remote()
    found = sync.pull(tag)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint under {url}/{CHECKPOINTS}")
    return found
