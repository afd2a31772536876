"""Pre-trained model states shared by the trials of one experiment.

User pre-training does not depend on lambda or the aggregator, and MI pre-training does not
depend on lambda, so trials that agree on the remaining settings can start group training
from one stored state instead of each repeating the pre-training. Each state is a file in
the experiment folder, named by a hash of every setting it depends on.

The first trial that needs a state computes it while holding a file lock. Trials that need
the same state meanwhile wait on the lock and then load the file, which appears atomically
because it is written to a temporary name and then renamed. A trial that dies while
computing releases the lock with its process, and the next waiting trial computes the state
instead.

NOTE: the lock is an fcntl lock (filelock.UnixFileLock). Trials on several nodes share
states only when the storage path is a shared POSIX file system that supports such locks
(for example NFS); object stores such as S3 are not supported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock

import groupim
from groupim.config import TrainConfig

logger = logging.getLogger(__name__)

USER_PHASE = "user"
MI_PHASE = "mi"

# TrainConfig fields that the phase does not read. Every other field is part of the key, so
# a field added to TrainConfig later makes states more specific, never wrongly shared.
# groupim.train.pretrain_user reads neither the aggregator nor lambda nor the group or MI
# settings. It always normalises a user over its own items, so member_norm does not matter.
USER_PHASE_IGNORED = frozenset({
    "lambda_mi", "aggregator", "lr", "epochs", "negatives_per_group", "negatives_exclude_members",
    "member_norm", "pretrain_mi", "pretrain_mi_epochs", "device", "num_threads",
})
# MI pre-training starts from the user pre-trained state, so its key covers the user phase
# too. Lambda and the group-training length are the only settings it never reads.
MI_PHASE_IGNORED = frozenset({"lambda_mi", "epochs", "device", "num_threads"})

# Bump when the stored layout changes, so older files are not loaded.
STORE_FORMAT = 1


@dataclass(frozen=True)
class PhaseKey:
    """The identity of one pre-trained state."""

    phase: str  # USER_PHASE or MI_PHASE
    settings: dict[str, Any]  # everything the state depends on

    @property
    def name(self) -> str:
        encoded = json.dumps(self.settings, sort_keys=True).encode()
        return f"{self.phase}-{hashlib.sha256(encoded).hexdigest()[:16]}"


@dataclass(frozen=True)
class StoredState:
    """A pre-trained state as one trial obtained it."""

    key: PhaseKey
    state: dict[str, torch.Tensor]  # model state dict entries that the phase produced
    info: dict[str, Any]  # what the phase function returned (metrics, history)
    reused: bool  # another trial computed it; this one only waited and loaded
    compute_seconds: float  # wall time of the computation, by whichever trial did it
    seconds: float  # wall time this trial spent: computing, or waiting and loading


def phase_key(phase: str, config: TrainConfig, data_checksum: str) -> PhaseKey:
    """Return the key of the `phase` state that a trial with `config` needs."""
    ignored = {USER_PHASE: USER_PHASE_IGNORED, MI_PHASE: MI_PHASE_IGNORED}[phase]
    settings = {name: value for name, value in config.to_dict().items() if name not in ignored}
    settings.update(
        phase=phase,
        data_checksum=data_checksum,
        groupim_version=groupim.__version__,
        store_format=STORE_FORMAT,
    )
    return PhaseKey(phase, settings)


class PretrainingStore:
    """A folder of pre-trained states, safe for concurrent trials on one file system."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def state_path(self, key: PhaseKey) -> Path:
        return self.folder / f"{key.name}.pt"

    def get_or_compute(
        self, key: PhaseKey, compute: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    ) -> StoredState:
        """Load the state of `key`, or compute it with `compute()` -> (state, info) and store it.

        Among trials that call this at once with the same key, exactly one runs `compute`.
        """
        start = time.perf_counter()
        path = self.state_path(key)
        if path.is_file():
            return self._load(key, start)

        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / f"{key.name}.lock")):
            if path.is_file():
                return self._load(key, start)
            logger.info("computing %s pre-training %s", key.phase, key.name)
            state, info = compute()
            compute_seconds = time.perf_counter() - start
            self._write(key, state, info, compute_seconds)
        return StoredState(key, state, info, False, compute_seconds, compute_seconds)

    def entries(self) -> list[dict[str, Any]]:
        """Read the metadata of every stored state: key settings, info and compute seconds."""
        return [json.loads(path.read_text()) for path in sorted(self.folder.glob("*.json"))]

    def _load(self, key: PhaseKey, start: float) -> StoredState:
        payload = torch.load(self.state_path(key), map_location="cpu", weights_only=True)
        if payload.get("settings") != key.settings:
            raise RuntimeError(
                f"{self.state_path(key)} contains settings {payload.get('settings')} but its name is the hash of "
                f"{key.settings}; delete the file so that the next trial computes it again"
            )
        logger.info("reusing %s pre-training %s", key.phase, key.name)
        return StoredState(
            key, payload["state"], payload["info"], True, payload["compute_seconds"], time.perf_counter() - start
        )

    def _write(self, key: PhaseKey, state: dict[str, torch.Tensor], info: dict[str, Any], seconds: float) -> None:
        payload = {
            "settings": key.settings,
            "state": {name: tensor.detach().cpu() for name, tensor in state.items()},
            "info": info,
            "compute_seconds": seconds,
        }
        summary = {"name": key.name, "settings": key.settings, "info": info, "compute_seconds": seconds}
        # The .pt file is what readers wait for, so it appears last and in one rename.
        _write_atomically(self.folder / f"{key.name}.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        _write_atomically(self.state_path(key), lambda tmp: torch.save(payload, tmp))


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
