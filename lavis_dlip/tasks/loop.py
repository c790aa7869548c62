"""The training step and inner loop, where LAVIS keeps them: on the task.

``TrainLoop`` stands left of a LAVIS task (the plugin's own tasks have it in their
bases; ``runner_dlip`` gives it to LAVIS's own tasks, ``adopt``) and replaces what LAVIS
1.0.2's ``BaseTask`` does that does not fit CPUs, several loss terms or long runs:

* ``train_step`` returns ``(loss, terms)``: LAVIS's keeps only ``loss`` and logs only it
  and the lr; here every ``loss_*`` term of the model's output (or of the distillation
  step) is averaged over the epoch, shown in the progress bar and logged;
* ``_train_inner_loop`` moves each batch to the model's device (LAVIS's ``prepare_sample``
  calls ``.cuda()``), applies per-module lr multipliers (``run.lr_mult``) after LAVIS's
  scheduler, divides the loss by ``accum_grad_iters`` (LAVIS's does not), uses amp on
  CUDA only, and stops a diverging run before the backward pass of the step that shows it
  (``Diverged``; the runner says what was kept);
* ``train_epoch`` can start mid-epoch (``EpochPosition``: batches done, the running sums,
  the stream's positions) and hands its position to ``save`` every ``save_every``
  optimizer steps (``run.save_every_n_steps``: the runner writes a checkpoint);
* ``evaluation`` passes ``cuda_enabled`` from the model's device (LAVIS's runner passes
  nothing and BaseTask defaults to ``.cuda()``: runner_base.py:469 -> base_task.py:88).
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.datasets.data_utils import apply_to_sample
from tqdm.auto import tqdm

from lavis_dlip.checkpoint import first_line

logger = logging.getLogger(__name__)
NON_FINITE = re.compile(r"\b(inf|nan)\b", re.IGNORECASE)  # how torch's errors say a tensor overflowed


class Diverged(FloatingPointError):
    """Training diverged at ``(epoch, step)``; ``what`` says how it showed."""

    def __init__(self, epoch: int, step: int, what: str):
        super().__init__(f"training diverged at epoch {epoch}, step {step}: {what}")
        self.epoch, self.step, self.what = epoch, step, what


@dataclass
class EpochPosition:
    """Where one process stopped in an epoch, at an optimizer-step boundary: what resuming
    needs to continue it as if it had not stopped (the RNG states travel beside it)."""

    batches: int = 0  # batches of this epoch done
    sums: dict[str, float] = field(default_factory=dict)  # the running sums of the logged terms
    seen: int = 0  # samples trained on
    skipped: int = 0  # a stream's samples that did not decode
    seconds: float = 0.0  # time spent on this epoch
    workers: int = 1  # the loader's worker processes (a stream's positions are per worker role)
    streams: dict[int, list[int]] = field(default_factory=dict)  # role -> [yielded, taken per source...]

    def stream_resume(self) -> dict[str, Any]:
        """What ``ShardStream.resume_at`` reads."""
        return {"workers": self.workers, "batches": self.batches, "roles": dict(self.streams)}


class TrainLoop:
    run_cfg: Any = None  # the run's config (runner_dlip sets it: progress bar, lr multipliers)

    def train_step(self, model, samples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LAVIS's step (the model's loss), with every ``loss_*`` term of its output."""
        output = model(samples)
        return output["loss"], _loss_terms(output)

    def evaluation(self, model, data_loader, cuda_enabled=None, **kwargs):
        if cuda_enabled is None:
            cuda_enabled = next(model.parameters()).device.type == "cuda"
        return super().evaluation(model, data_loader, cuda_enabled=cuda_enabled, **kwargs)

    def train_epoch(self, epoch, model, data_loader, optimizer, lr_scheduler, scaler=None, cuda_enabled=False,
                    log_freq=50, accum_grad_iters=1, position: Optional[EpochPosition] = None,
                    save: Optional[Callable[[EpochPosition], None]] = None, save_every: int = 0):
        return self._train_inner_loop(epoch=epoch, iters_per_epoch=len(data_loader), model=model,
                                      data_loader=data_loader, optimizer=optimizer, scaler=scaler,
                                      lr_scheduler=lr_scheduler, log_freq=log_freq, cuda_enabled=cuda_enabled,
                                      accum_grad_iters=accum_grad_iters, position=position, save=save,
                                      save_every=save_every)

    def _train_inner_loop(self, epoch, iters_per_epoch, model, data_loader, optimizer, lr_scheduler, scaler=None,
                          start_iters=None, log_freq=50, cuda_enabled=False, accum_grad_iters=1,
                          position: Optional[EpochPosition] = None,
                          save: Optional[Callable[[EpochPosition], None]] = None, save_every: int = 0):
        """One epoch (from ``position`` when resumed mid-epoch: the loader starts there too);
        its average of every loss term, the lr and samples/s (formatted as LAVIS logs them)."""
        run_cfg = self.run_cfg or {}
        device = next(model.parameters()).device
        amp = scaler is not None and scaler.is_enabled() and device.type == "cuda"
        at = position or EpochPosition(workers=max(int(getattr(data_loader, "num_workers", 0)), 1))
        sums: dict[str, float] = defaultdict(float, at.sums)
        seen, skipped, streams, n = at.seen, at.skipped, dict(at.streams), iters_per_epoch
        start = time.time() - at.seconds
        bar = tqdm(total=n, initial=at.batches, desc=f"train epoch {epoch}", dynamic_ncols=True, mininterval=1.0,
                   disable=not (bool(run_cfg.get("progress", True)) and is_main_process()))
        optimizer.zero_grad(set_to_none=True)
        for i, samples in enumerate(data_loader, start=at.batches):
            if "n_skipped" in samples:  # a stream's samples that did not decode (datasets/stream.py)
                skipped += int(samples.pop("n_skipped").sum())
            if "stream_pos" in samples:  # where the worker that made this batch is in its stream
                role, *where = samples.pop("stream_pos")[-1].tolist()
                streams[role] = where
            samples = apply_to_sample(lambda t: t.to(device, non_blocking=True), samples)
            samples.update({"epoch": epoch, "num_iters_per_epoch": n, "iters": i})
            lr_scheduler.step(cur_epoch=epoch, cur_step=i)
            for group in optimizer.param_groups:  # LAVIS's schedulers set one lr on every group
                group["lr"] *= group.get("lr_mult", 1.0)
            try:
                with torch.autocast(device_type=device.type, enabled=amp):
                    loss, terms = self.train_step(model=model, samples=samples)
            except (RuntimeError, ValueError) as err:  # e.g. LAVIS's ITM sampling (multinomial) on NaN similarities
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    raise Diverged(epoch, i, "the model's weights are no longer finite") from err
                if NON_FINITE.search(str(err)):
                    raise Diverged(epoch, i, f"the forward pass met inf or nan ({first_line(err)})") from err
                raise
            if not torch.isfinite(loss):  # before backward: a NaN step must not reach the weights
                raise Diverged(epoch, i, f"the loss is {loss.item()}")
            scaled = loss / accum_grad_iters
            (scaler.scale(scaled) if amp else scaled).backward()
            if (i + 1) % accum_grad_iters == 0 or i + 1 == n:
                if amp:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in {"loss": loss.detach(), **terms}.items():
                sums[k] += float(v)
            seen += _batch_size(samples)
            bar.update(1)
            bar.set_postfix({k: f"{v / (i + 1):.3f}" for k, v in sums.items()}
                            | {"lr": f"{_lr(optimizer):.2e}",
                               "samples/s": f"{seen * get_world_size() / max(time.time() - start, 1e-9):.1f}"},
                            refresh=False)
            if save is not None and save_every and (i + 1) % (accum_grad_iters * save_every) == 0 and i + 1 < n:
                save(EpochPosition(i + 1, dict(sums), seen, skipped, time.time() - start, at.workers, dict(streams)))
        bar.close()
        averages = _average_across_processes(sums, n, device)
        averages["lr"] = _lr(optimizer)
        averages["samples_per_s"] = seen * get_world_size() / max(time.time() - start, 1e-9)
        if skipped or hasattr(data_loader.dataset, "configure"):  # a stream: its skipped samples, this process's
            averages["skipped_samples"] = float(skipped)
        logger.info("epoch %d: %s", epoch, averages)
        return {k: f"{v:.4f}" for k, v in averages.items()}


def adopt(task, run_cfg):
    """``task`` with the plugin's step and loop: its own class when that has ``TrainLoop``
    (the plugin's tasks), else a subclass of LAVIS's with ``TrainLoop`` left of it."""
    if not isinstance(task, TrainLoop):
        task.__class__ = type(f"Dlip{type(task).__name__}", (TrainLoop, type(task)), {})
    task.run_cfg = run_cfg
    return task


def _lr(optimizer) -> float:
    """The scheduled lr (before a group's multiplier)."""
    group = optimizer.param_groups[0]
    return group["lr"] / (group.get("lr_mult") or 1.0)


def _loss_terms(output) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in output.items() if k.startswith("loss_") and torch.is_tensor(v) and v.dim() == 0}


def _batch_size(samples: dict) -> int:
    for value in samples.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def _average_across_processes(sums: dict[str, float], n_iters: int, device) -> dict[str, float]:
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys] + [float(n_iters)], dtype=torch.float64)
    if is_dist_avail_and_initialized():
        values = values.to(device)
        dist.all_reduce(values)
        values = values.cpu()
    count = max(values[-1].item(), 1.0)
    return {k: values[i].item() / count for i, k in enumerate(keys)}
