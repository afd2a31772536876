"""The three training phases of GroupIM and a short driver that runs them in order.

1. `pretrain_user`: the user encoder learns to reconstruct each training user's items;
   the epoch with the best validation-user NDCG@100 is kept.
2. `pretrain_mi`: the discriminator (MI estimator) learns to tell members from negatives.
3. `train_group`: L_G + lambda * L_UG + L_MI on training groups, evaluated on validation
   groups; the state with the best validation NDCG@100 is kept.

Progress leaves through a callback, so the command line, a Ray trial and a test share
this loop. Each epoch reseeds torch and NumPy from (seed, phase, epoch), so a run
resumed from a checkpoint continues exactly as an uninterrupted one would on the CPU.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from groupim.batching import GroupBatcher, NegativeSampler, make_bags
from groupim.config import ConfigError, TrainConfig
from groupim.evaluate import evaluate_groups, evaluate_users
from groupim.metrics import SELECTION_METRIC
from groupim.model import GroupIM

if TYPE_CHECKING:
    from groupim.data import GroupIMData

logger = logging.getLogger(__name__)

PHASE_USER, PHASE_MI, PHASE_GROUP = 1, 2, 3


@dataclass
class Evaluation:
    """One validation evaluation during group training, as passed to the callback."""

    epoch: int  # group-training epochs completed (1-based)
    metrics: dict[str, float]  # validation group metrics
    train_loss: float  # mean training loss of this epoch
    seconds: float  # wall time of this epoch's training, without the evaluation
    is_best: bool  # this evaluation improved the selection metric
    model: GroupIM
    optimizer: torch.optim.Optimizer
    state: "GroupState"

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to resume group training after this epoch (see `train_group`)."""
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_epoch": self.state.best_epoch,
            "best_metrics": dict(self.state.best_metrics),
            "best_model": self.state.best_model,
            "history": list(self.state.history),
            "train_losses": list(self.state.train_losses),
        }


Callback = Callable[[Evaluation], "bool | None"]


@dataclass
class GroupState:
    """Best-so-far bookkeeping of group training."""

    best_epoch: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_model: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # one record per evaluation
    train_losses: list[float] = field(default_factory=list)  # one per epoch
    stopped_early: bool = False


@dataclass
class FitResult:
    model: GroupIM  # the model with the best group-training state
    user_pretraining: dict[str, Any]
    mi_pretraining: dict[str, Any]
    group: GroupState


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but CUDA is not available; use device=auto or cpu")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def build_model(config: TrainConfig, n_items: int) -> GroupIM:
    """Build a freshly initialised model; the seed fixes the initial weights."""
    torch.manual_seed(config.seed)
    model = GroupIM.from_config(n_items, config)
    device = resolve_device(config)
    if device.type == "cpu":
        reuse_freed_memory()
    return model.to(device)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters, from malloc.h


def reuse_freed_memory() -> bool:
    """Make glibc keep freed blocks of up to 32 MB for reuse; False where libc is not glibc.

    Every training batch allocates and frees [I, D] and [B, I] tensors of 6 to 26 MB.
    glibc serves large blocks with fresh memory maps and returns freed memory to the
    system, so a batch page-faults memory that the previous batch released. Raising the
    mmap threshold to its 64-bit maximum, 32 MB, and switching off heap trimming saved
    about 7 % of a group epoch at embedding size 128 on one thread (benchmarks/RESULTS.md).
    The setting affects the whole process, and calling this again does no harm.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mmap_set = mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    trim_set = mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(mmap_set and trim_set)


def make_optimizer(model: GroupIM, lr: float, config: TrainConfig) -> torch.optim.Adam:
    """Adam over all parameters, with the fused kernel: one pass over each [I, D] weight per step."""
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay, fused=True)


def is_eval_epoch(epoch_index: int, total_epochs: int, config: TrainConfig) -> bool:
    """Return whether the epoch with 0-based `epoch_index` ends with an evaluation.

    Default: every `eval_freq` completed epochs and always the final one. With
    eval_final_epoch=False, the reference notebook's rule `epoch_index % eval_freq == 0`,
    which never evaluates the last epochs of a phase.
    """
    if not config.eval_final_epoch:
        return epoch_index % config.eval_freq == 0
    completed = epoch_index + 1
    return completed % config.eval_freq == 0 or completed == total_epochs


def seed_epoch(config: TrainConfig, phase: int, epoch_index: int) -> np.random.Generator:
    """Seed torch for this epoch and return its NumPy generator."""
    sequence = np.random.SeedSequence([config.seed, phase, epoch_index])
    torch.manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0] % (2**63)))
    return np.random.default_rng(sequence)


def train_batcher(data: "GroupIMData", config: TrainConfig) -> GroupBatcher:
    sampler = NegativeSampler(data.member_items, config.negatives_per_group, config.negatives_exclude_members)
    return GroupBatcher(
        data.train_groups.group_members, data.train_groups.group_items, data.member_items, config.member_norm, sampler
    )


def validation_group_metrics(model: GroupIM, data: "GroupIMData", config: TrainConfig) -> dict[str, float]:
    split = data.val_groups
    return evaluate_groups(model, split.group_members, split.group_items, data.member_items, config.member_norm)


def pretrain_user(model: GroupIM, data: "GroupIMData", config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Phase 1: fit the encoder to each training user's items; keep the best validation epoch.

    Afterwards the group predictor starts from the learned item embeddings.
    """
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config.pretrain_user_lr, config)
    user_items = data.train_user_items  # [training users, I]
    val = data.val_users
    best_metric, best_state, best_epoch, history = -math.inf, None, 0, []

    for epoch in tqdm(range(config.pretrain_user_epochs), desc="user pre-training", disable=not progress):
        start = time.perf_counter()
        rng = seed_epoch(config, PHASE_USER, epoch)
        order = rng.permutation(user_items.shape[0]) if config.shuffle else np.arange(user_items.shape[0])
        model.train()
        losses = []
        for begin in range(0, len(order), config.batch_size):
            # Pre-training always L2-normalises each user over its own items.
            bags = make_bags(user_items, order[begin : begin + config.batch_size]).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = model.user_pretraining_loss(bags)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        loss = check_loss(float(np.mean(losses)), "user pre-training", epoch)
        record = {"epoch": epoch + 1, "loss": loss, "seconds": time.perf_counter() - start}

        if is_eval_epoch(epoch, config.pretrain_user_epochs, config):
            metrics = evaluate_users(model, val.fold_in, val.held_out, pretraining=True)
            record.update({f"val_user_{k}": v for k, v in metrics.items()})
            if metrics[SELECTION_METRIC] > best_metric:
                best_metric, best_epoch = metrics[SELECTION_METRIC], epoch + 1
                best_state = copy.deepcopy(model.state_dict())
        history.append(record)
        logger.info("user pre-training epoch %d: %s", epoch + 1, _format(record))

    if best_state is not None:
        model.load_state_dict(best_state)
    with torch.no_grad():
        model.group_predictor.copy_(model.encoder.user_predictor)
    return {"best_epoch": best_epoch, f"val_user_{SELECTION_METRIC}": best_metric, "history": history}


def pretrain_mi(model: GroupIM, data: "GroupIMData", config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Phase 2: train the discriminator on members (positives) against sampled negatives."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config.lr, config)
    batcher = train_batcher(data, config)
    history = []
    for epoch in tqdm(range(config.pretrain_mi_epochs), desc="MI pre-training", disable=not progress):
        start = time.perf_counter()
        rng = seed_epoch(config, PHASE_MI, epoch)
        model.train()
        losses = []
        for batch in batcher.batches(config.batch_size, rng, shuffle=config.shuffle):
            optimizer.zero_grad(set_to_none=True)
            loss = model.mi_pretraining_loss(batch.to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        loss = check_loss(float(np.mean(losses)), "MI pre-training", epoch)
        record = {"epoch": epoch + 1, "loss_mi": loss, "seconds": time.perf_counter() - start}
        history.append(record)
        logger.info("MI pre-training epoch %d: %s", epoch + 1, _format(record))
    return {"history": history}


def train_group(
    model: GroupIM,
    data: "GroupIMData",
    config: TrainConfig,
    callback: Callback | None = None,
    resume: dict[str, Any] | None = None,
    progress: bool = True,
) -> GroupState:
    """Phase 3: group training with validation every `eval_freq` epochs.

    `resume` is a dict from `Evaluation.checkpoint()`: training continues after its epoch
    with its model, optimizer and best-so-far state. The callback receives every
    evaluation and stops training by returning True. On return the model holds the best
    state seen.
    """
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config.lr, config)
    state = GroupState()
    start_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        state = GroupState(
            resume["best_epoch"],
            dict(resume["best_metrics"]),
            resume["best_model"],
            list(resume["history"]),
            list(resume.get("train_losses", [])),
        )
        start_epoch = int(resume["epoch"])
    batcher = train_batcher(data, config)
    best = state.best_metrics.get(SELECTION_METRIC, -math.inf)

    for epoch in tqdm(range(start_epoch, config.epochs), desc="group training", disable=not progress):
        start = time.perf_counter()
        rng = seed_epoch(config, PHASE_GROUP, epoch)
        model.train()
        losses = []
        for batch in batcher.batches(config.batch_size, rng, shuffle=config.shuffle):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = model.group_loss(batch.to(device), config.lambda_mi)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - start
        train_loss = check_loss(float(np.mean(losses)), "group training", epoch)
        state.train_losses.append(train_loss)
        if not is_eval_epoch(epoch, config.epochs, config):
            logger.info("group epoch %d: loss %.4f (%.1f s)", epoch + 1, train_loss, seconds)
            continue

        metrics = validation_group_metrics(model, data, config)
        # NaN never counts as an improvement, so a diverged run keeps its last good state.
        is_best = metrics[SELECTION_METRIC] > best
        if is_best:
            best = metrics[SELECTION_METRIC]
            state.best_epoch, state.best_metrics = epoch + 1, dict(metrics)
            state.best_model = copy.deepcopy(model.state_dict())
        state.history.append({"epoch": epoch + 1, "train_loss": train_loss, "seconds": seconds, **metrics})
        logger.info("group epoch %d: loss %.4f, %s (%.1f s)", epoch + 1, train_loss, _format(metrics), seconds)
        if callback is not None:
            event = Evaluation(epoch + 1, metrics, train_loss, seconds, is_best, model, optimizer, state)
            if callback(event):
                state.stopped_early = epoch + 1 < config.epochs
                break

    if state.best_model is not None:
        model.load_state_dict(state.best_model)
    return state


def fit(
    config: TrainConfig, data: "GroupIMData", callback: Callback | None = None, progress: bool = True
) -> FitResult:
    """Run the three phases as `config` enables them and return the best model."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    model = build_model(config, data.n_items)
    user_result = pretrain_user(model, data, config, progress) if config.pretrain_user else {}
    mi_result = pretrain_mi(model, data, config, progress) if config.pretrain_mi else {}
    group_state = train_group(model, data, config, callback, progress=progress)
    return FitResult(model, user_result, mi_result, group_state)


def check_loss(loss: float, phase: str, epoch_index: int) -> float:
    """Return the epoch's mean loss, or raise TrainingDiverged when it is NaN or infinite."""
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"{phase} diverged in epoch {epoch_index + 1}: mean loss {loss}; lower the learning rate or lambda_mi"
        )
    return loss


def _format(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
