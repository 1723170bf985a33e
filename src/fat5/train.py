"""The training loop shared by ``fat5 pretrain`` (pretrain.py) and ``fat5 finetune`` (finetune.py).

One optimizer step of ``Trainer.fit``: draw ``grad_accum`` micro-batches, forward/backward each (gradient
all-reduce only on the last under DDP), clip, check the loss and gradient norm (non-finite: the update is
dropped, on the device where the optimizer allows it: AdamWScale on CUDA, fused AdamW), step the optimizer
and the LR schedule. The host reads the step's numbers only at logging, eval and checkpoint steps (one
sync per interval); there it warns about dropped updates and stops with an error after ``max_bad_steps`` in
a row (so a divergence is reported at the next logging step). Around it: eval
on the held-out split every ``eval_every`` steps, atomic checkpoints every ``ckpt_every`` steps and on
SIGINT/SIGTERM, logs (tqdm, CSV, TensorBoard, a PNG plot). The model is any
``FAT5ForConditionalGeneration``; data is any iterator of batch dicts (the UL2 stream for pretraining,
seq2seq pairs for finetuning); a ``state_dict()`` on it makes resumption exact.

Loss normalisation: the model returns the mean over a micro-batch's label tokens; the loop reweights each
micro-batch by its share of the label tokens of the whole step (all micro-batches, all ranks), so the
gradient is the mean over every label token of the global batch whatever the split into micro-batches and
processes (one process with batch 8 and two with batch 4 give the same step, up to float summation order).

Precision (``train.precision``): ``fp32``; ``bf16-autocast`` (fp32 master weights, bf16 matmuls);
``bf16-kahan`` (bf16 weights and states, Kahan-compensated AdamWScale updates); ``bf16`` (pure bf16, no
compensation). ``auto``: bf16-autocast on a bf16-capable GPU, else fp32.

Throughput and MFU: model FLOPs per step come from ``fat5.flops.step_flops`` (counted on the padded batch
shapes, what the hardware computes; the same formula as ``fat5 bench``). MFU divides by the peak:
``--peak-tflops`` / ``train.peak_tflops``, else a dense-bf16 table value for known GPUs; on CPU no MFU is
shown unless a peak is given. tokens/s counts real (non-padding) encoder + decoder tokens.

Checkpoints (``OUT/checkpoints/step-NNNNNNNN/``): ``model.safetensors`` + ``config.json`` written by
``save_pretrained``, ``trainer_state.pt`` (optimizer, schedule, step, per-rank data position and RNG states;
loaded with ``weights_only=True``) and ``run.yaml``. The folder is written under a temporary name and
renamed, then ``OUT/checkpoints/latest`` is replaced atomically: a crash mid-write leaves the previous
checkpoint intact. Limits: the global numpy RNG is not saved (fat5 does not use it); resuming requires the
same world size (the data position is per rank).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed as D
from .flops import step_flops
from .model import FAT5ForConditionalGeneration
from .optim import build_optimizer, build_scheduler, optimizer_step
from .runconfig import RunConfig, load_run_config, model_config_diff, save_run_config

STATE_FILE = "trainer_state.pt"
LATEST = "latest"

# dense bf16 peak FLOP/s (no sparsity) by GPU name fragment, for MFU when --peak-tflops is not given
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


class TrainingDiverged(RuntimeError):
    pass


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-autocast"
    return "fp32"


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------------------- logging
class RunLog:
    """CSV (``train.csv``, ``eval.csv``), TensorBoard (``tb/``) and ``loss.png`` under the run folder."""

    def __init__(self, out: Path, resume_step: int | None):
        self.out = out
        self.train_rows = self._read("train.csv", resume_step)
        self.eval_rows = self._read("eval.csv", resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step)

    def _read(self, name: str, resume_step: int | None) -> list[dict]:
        path = self.out / name
        if resume_step is None or not path.exists():
            path.unlink(missing_ok=True)
            return []
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        rows = [r for r in rows if r["step"] <= resume_step]  # drop what the checkpoint does not hold
        self._rewrite(path, rows)
        return rows

    @staticmethod
    def _rewrite(path: Path, rows: list[dict]) -> None:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def _append(self, name: str, rows: list[dict], row: dict) -> None:
        rows.append(row)
        path = self.out / name
        if path.exists() and set(row) == set(rows[0]) and len(rows) > 1:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=list(rows[0])).writerow(row)
        else:  # first row, or a new column appeared
            self._rewrite(path, rows)
        prefix = "train" if name == "train.csv" else "eval"
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(f"{prefix}/{k}", v, int(row["step"]))

    def log_train(self, row: dict) -> None:
        self._append("train.csv", self.train_rows, row)

    def log_eval(self, row: dict) -> None:
        self._append("eval.csv", self.eval_rows, row)
        self.tb.flush()
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        if self.train_rows:
            ax1.plot(
                [r["step"] for r in self.train_rows], [r["loss"] for r in self.train_rows], label="train"
            )
            ax2.plot([r["step"] for r in self.train_rows], [r["lr"] for r in self.train_rows])
        ev = [r for r in self.eval_rows if "val_loss" in r]
        if ev:
            ax1.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val")
        ax1.set(xlabel="step", ylabel="loss", title="loss")
        ax1.legend()
        ax1.grid(alpha=0.3)
        ax2.set(xlabel="step", ylabel="learning rate", title="learning rate")
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.out / "loss.tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.out / "loss.png")

    def close(self) -> None:
        self.tb.close()


# --------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run (``OUT/checkpoints/latest``), or None."""
    root = Path(out) / "checkpoints"
    pointer = root / LATEST
    if pointer.exists():
        path = root / pointer.read_text().strip()
        if (path / STATE_FILE).exists():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists()) if root.exists() else []
    return done[-1] if done else None


def check_model_config(ckpt: Path, model) -> None:
    # through the config class, so fields that config.json leaves out (defaults) compare equal
    saved = type(model.config).from_pretrained(str(ckpt)).to_dict()
    diff = model_config_diff(saved, model.config.to_dict())
    if diff:
        fields = "; ".join(
            f"{k}: checkpoint {a!r} vs now {b!r}" for k, b, a in ((k, v[1], v[0]) for k, v in diff.items())
        )
        raise ValueError(
            f"cannot resume from {ckpt}: the model config differs in {len(diff)} field(s): {fields}. "
            "Resume with the run's own settings (see its run.yaml) or start a new --out folder."
        )


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def write_checkpoint(
    out: Path, step: int, model, model_state: dict, trainer_state: dict, cfg: RunConfig, keep: int
) -> Path:
    """Write ``OUT/checkpoints/step-N`` atomically (temp folder + rename), point ``latest`` at it, prune."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), state_dict=model_state)
        torch.save(trainer_state, tmp / STATE_FILE)
        save_run_config(cfg, tmp / "run.yaml")
        final = root / name
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            old = root / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, root / LATEST)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _autocast(precision: str, device: torch.device):
    if precision == "bf16-autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _real_tokens(b: dict) -> torch.Tensor:
    enc = b["attention_mask"].sum() if "attention_mask" in b else b["input_ids"].numel()
    dec = b["decoder_attention_mask"].sum() if "decoder_attention_mask" in b else (b["labels"] != -100).sum()
    return enc + dec


def _to_device(batch: dict, device: torch.device) -> dict:
    # from pageable memory a host-to-device copy first waits for the stream to drain (a host sync every
    # step); staged through pinned memory it is asynchronous
    if device.type == "cuda":
        return {
            k: (v.pin_memory() if v.device.type == "cpu" else v).to(device, non_blocking=True)
            for k, v in batch.items()
        }
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Trains ``model`` on ``train_data`` (an iterator of this rank's micro-batches) as ``cfg`` says.

    ``val_data()`` returns a fresh iterable of validation batches (this rank's share) for each eval;
    ``eval_hook(trainer)`` may add metrics to each eval (finetuning: exact match). ``on_step_end`` hooks run
    after every optimizer step (tests use it to simulate an interruption via ``request_stop``).
    """

    def __init__(
        self,
        cfg: RunConfig,
        model: FAT5ForConditionalGeneration,
        train_data: Iterable[dict],
        out: str | os.PathLike,
        val_data: Callable[[], Iterable[dict]] | None = None,
        dist: D.DistInfo | None = None,
        eval_hook: Callable[[Trainer], dict] | None = None,
        resume: bool = False,
        show_progress: bool = True,
    ):
        self.cfg, self.model, self.train_source = cfg, model, train_data
        self.out = Path(out)
        self.val_data, self.eval_hook = val_data, eval_hook
        self.dist = dist or D.DistInfo(device=D.pick_device(cfg.train.device))
        self.device = self.dist.device
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.show_progress = show_progress
        self.on_step_end: list[Callable[[Trainer], None]] = []
        self.step = 0
        self.bad_steps = 0
        self.history: list[
            float
        ] = []  # global mean train loss per optimizer step (since this Trainer started)
        self._stop = False  # agreed by every rank: the loop ends after this step
        self._stop_requested = False  # this rank's request (signal, hook), agreed at the next read-back
        self._signal_count = 0
        self._resume_from = latest_checkpoint(self.out) if resume else None
        if resume and self._resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
        self._setup()

    # ------------------------------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        state = None
        if self._resume_from is not None:
            check_model_config(self._resume_from, self.model)
            from .hf import load_checked, read_state_dict

            load_checked(self.model, read_state_dict(self._resume_from), str(self._resume_from))
            state = torch.load(self._resume_from / STATE_FILE, map_location="cpu", weights_only=True)
        if self.precision in ("bf16", "bf16-kahan"):
            self.model.to(torch.bfloat16)
        elif self.precision in ("fp32", "bf16-autocast"):
            self.model.to(torch.float32)
        else:
            raise ValueError(f"unknown precision {self.precision!r}")
        self.model.to(self.device)
        self.engine = D.wrap_model(self.model, self.dist, t.parallel)
        if t.compile:
            self.engine = torch.compile(
                self.engine, mode=None if t.compile_mode == "default" else t.compile_mode
            )
        # CUDA-graph modes replay one recorded graph per shape: each forward must mark a new step so the
        # graph may reuse the memory of the previous step's outputs (already consumed by then)
        self._graph_steps = t.compile and t.compile_mode in ("reduce-overhead", "max-autotune")
        o, s = cfg.optim, cfg.schedule
        if self.precision == "bf16-kahan" and o.name != "adamwscale":
            raise ValueError(f"precision bf16-kahan needs optim.name=adamwscale (got {o.name!r})")
        self.optimizer = build_optimizer(
            o.name,
            self.model.parameters(),
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            kahan=self.precision == "bf16-kahan",
        )
        self.scheduler = build_scheduler(
            self.optimizer, s.name, t.max_steps, s.warmup_steps, s.min_lr_ratio, s.decay_fraction
        )
        # the optimizer's tensors (the model's parameters, after any sharding), listed once instead of walking
        # the module tree on every step
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if state is not None:
            self._load_state(state)
        self.peak = (
            (t.peak_tflops * 1e12)
            if t.peak_tflops
            else ((default_peak_tflops(self.device) or 0) * 1e12 or None)
        )
        self.log = RunLog(self.out, self.step if self._resume_from else None) if self.dist.is_main else None

    def _load_state(self, state: dict) -> None:
        if state["world_size"] != self.dist.world_size:
            raise ValueError(
                f"the checkpoint was written by {state['world_size']} process(es), this run has "
                f"{self.dist.world_size}: resume with the same --nproc_per_node (the data position is per rank)"
            )
        D.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        data_state = state["data"][self.dist.rank]
        if data_state is not None and hasattr(self.train_source, "load_state_dict"):
            self.train_source.load_state_dict(data_state)
        _set_rng_state(state["rng"][self.dist.rank])

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """Every rank must call this (FSDP gathers shards); rank 0 writes. Returns the folder on rank 0."""
        model_state = (
            D.full_model_state(self.model) if (self.dist.is_main or D.is_sharded(self.model)) else None
        )
        optim_state = D.full_optimizer_state(self.model, self.optimizer)
        data = self.train_source.state_dict() if hasattr(self.train_source, "state_dict") else None
        datas, rngs = D.gather_objects(data), D.gather_objects(_rng_state())
        path = None
        if self.dist.is_main:
            trainer_state = {
                "step": self.step,
                "bad_steps": self.bad_steps,
                "world_size": self.dist.world_size,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "data": datas,
                "rng": rngs,
                "precision": self.precision,
            }
            path = write_checkpoint(
                self.out,
                self.step,
                self.model,
                model_state,
                trainer_state,
                self.cfg,
                self.cfg.train.keep_checkpoints,
            )
        D.barrier()
        return path

    def request_stop(self) -> None:
        """Save a checkpoint and stop at the end of the current step (what SIGINT/SIGTERM do)."""
        self._stop_requested = True

    def _on_signal(self, signum, frame) -> None:
        self._signal_count += 1
        if self._signal_count > 1:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.dist.is_main:
            print(
                f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                "(again to quit at once)",
                file=sys.stderr,
            )
        self._stop_requested = True

    # --------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.val_data is not None:
            self.model.eval()
            total = torch.zeros(2, device=self.device, dtype=torch.float64)
            for batch in self.val_data():
                batch = _to_device(batch, self.device)
                n = (batch["labels"] != -100).sum()
                with _autocast(self.precision, self.device):
                    loss = self.model(**batch).loss
                total += torch.stack([loss.double() * n, n.double()])
            D.all_reduce_sum(total)
            s, n = total.tolist()
            if n > 0:
                metrics["val_loss"] = s / n
            self.model.train()
        if self.eval_hook is not None:
            self.model.eval()
            metrics.update(self.eval_hook(self))
            self.model.train()
        return metrics

    # --------------------------------------------------------------------------------------- loop
    def _micro_batches(self, it: Iterator[dict]) -> list[dict]:
        out = []
        for _ in range(self.cfg.train.grad_accum):
            try:
                out.append(_to_device(next(it), self.device))
            except StopIteration:
                raise ValueError(
                    f"the training data ran out at step {self.step} (of train.max_steps={self.cfg.train.max_steps})"
                ) from None
        return out

    def train_step(self, micro: list[dict]) -> torch.Tensor:
        """One optimizer step. Returns a device tensor (global mean loss, grad norm, global real tokens,
        1 if the update was applied else 0, stop requests across ranks), read back by ``_drain`` only when
        the loop needs host values (logging, eval, checkpoints, stop): the step itself never syncs the host
        where the optimizer drops a non-finite step on the device (AdamWScale on CUDA, fused AdamW)."""
        ws = self.dist.world_size
        counts = torch.stack([(b["labels"] != -100).sum() for b in micro]).float()
        global_count = D.all_reduce_sum(counts.sum().clone()).clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        for i, b in enumerate(micro):
            last = i == len(micro) - 1
            if self._graph_steps:
                torch.compiler.cudagraph_mark_step_begin()
            with D.no_sync(self.engine, skip_sync=not last), _autocast(self.precision, self.device):
                loss = self.engine(**b).loss
            # DDP/FSDP average gradients over ranks: * ws undoes that, / global_count makes a global mean
            (loss * (counts[i] * ws / global_count)).backward()
            loss_sum += loss.detach().float() * counts[i]
        clip = self.cfg.optim.grad_clip
        params = [p for p in self._params if p.grad is not None]
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"), foreach=True)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        tokens = sum(_real_tokens(b) for b in micro)
        red = D.all_reduce_sum(
            torch.stack(
                # torch.full fills on the device; torch.tensor(x, device=cuda) would copy from the host (a sync)
                [loss_sum, tokens.float(), torch.full((), float(self._stop_requested), device=self.device)]
            )
        )
        loss_g = red[0] / global_count
        ok = torch.isfinite(loss_g) & torch.isfinite(gnorm.float())
        optimizer_step(self.optimizer, ~ok)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.filterwarnings("ignore", message="Detected call of", category=UserWarning)
            self.scheduler.step()
        self.step += 1
        return torch.stack([loss_g, gnorm.float().reshape(()), red[1], ok.float(), red[2]])

    def _drain(self, pending: list[tuple[int, torch.Tensor]]) -> list[list[float]]:
        """Read back the stats of the steps in ``pending`` (one sync), record their losses, count non-finite
        steps in a row (warn on each; ``max_bad_steps`` in a row: TrainingDiverged) and agree on a stop."""
        if not pending:
            return []
        rows = torch.stack([s for _, s in pending]).tolist()
        steps = [n for n, _ in pending]
        pending.clear()
        for step, (loss_v, gnorm_v, _, ok, _) in zip(steps, rows):
            self.history.append(loss_v)
            if ok:
                self.bad_steps = 0
                continue
            self.bad_steps += 1
            if self.dist.is_main:
                warnings.warn(
                    f"step {step}: non-finite loss/gradient (loss {loss_v}, grad norm "
                    f"{gnorm_v}); update skipped ({self.bad_steps} in a row)",
                    stacklevel=2,
                )
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise TrainingDiverged(
                    f"training diverged: {self.bad_steps} steps in a row had a non-finite loss or gradient "
                    f"(last at step {step}). Resume from the last checkpoint "
                    f"({latest_checkpoint(self.out)}) with a lower optim.lr, more schedule.warmup_steps, "
                    "optim.grad_clip, or train.precision=bf16-autocast / fp32."
                )
        if rows[-1][4] > 0:
            self._stop = True  # every rank reads the same reduced flag at the same step
        return rows

    def fit(self) -> list[float]:
        """Train to ``train.max_steps`` (or until a stop request); returns the loss per step of this call."""
        t = self.cfg.train
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_run_config(self.cfg, self.out / "run.yaml")
        handlers = {}
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self.model.train()
        it = iter(self.train_source)
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (self.dist.is_main and self.show_progress),
        )
        if self.dist.is_main and self._resume_from is not None:
            bar.write(f"resumed from {self._resume_from} at step {self.step}")
        window_rows: list[list[float]] = []
        window_flops, window_t0 = 0.0, time.perf_counter()
        last_saved = self.step if self._resume_from else None
        try:
            if t.eval_at_start and self.step == 0:
                self._eval_and_log(bar)
            pending: list[tuple[int, torch.Tensor]] = []  # steps whose stats the host has not read yet
            while self.step < t.max_steps and not self._stop:
                micro = self._micro_batches(it)
                lr = self.scheduler.get_last_lr()[0]
                pending.append((self.step + 1, self.train_step(micro)))
                b, le = micro[0]["input_ids"].shape
                ld = micro[0]["labels"].shape[1]
                window_flops += len(micro) * self.dist.world_size * step_flops(self.model.config, b, le, ld)
                bar.update(1)
                s = self.step
                # host values are read only where the loop needs them (one sync per logging interval); several
                # ranks read the same steps (a stop request of one rank is agreed at the next logging step)
                if (
                    s % t.log_every == 0
                    or s % t.eval_every == 0
                    or s % t.ckpt_every == 0
                    or s == t.max_steps
                    or (self._stop_requested and self.dist.world_size == 1)
                    or self.on_step_end
                ):
                    rows = self._drain(pending)
                    window_rows.extend(rows)
                if window_rows and (s % t.log_every == 0 or s == t.max_steps):
                    dt = max(time.perf_counter() - window_t0, 1e-9)
                    row = {
                        "step": s,
                        "loss": sum(r[0] for r in window_rows) / len(window_rows),  # window mean
                        "lr": lr,
                        "grad_norm": window_rows[-1][1],
                        "tokens_per_s": sum(r[2] for r in window_rows) / dt,
                    }
                    if self.peak:
                        row["mfu"] = window_flops / dt / self.peak
                    if self.log:
                        self.log.log_train(row)
                    mfu = f" mfu {row['mfu']:.1%}" if "mfu" in row else ""
                    bar.set_postfix_str(
                        f"loss {row['loss']:.4f} lr {lr:.2e} tok/s {row['tokens_per_s']:,.0f}{mfu}"
                    )
                    window_rows, window_flops, window_t0 = [], 0.0, time.perf_counter()
                if self.step % t.eval_every == 0 or self.step == t.max_steps:
                    self._eval_and_log(bar)
                for hook in self.on_step_end:
                    hook(self)
                if self._stop_requested and self.dist.world_size == 1:
                    self._stop = True  # one process: no agreement to wait for (ranks agree at a logging step)
                if self.step % t.ckpt_every == 0 or self.step == t.max_steps or self._stop:
                    path = self.save_checkpoint()
                    last_saved = self.step
                    if path is not None and (self._stop or self.step == t.max_steps):
                        bar.write(f"checkpoint: {path}")
        finally:
            bar.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
            if self.log:
                self.log.close()
        if self._stop and self.dist.is_main:
            print(f"stopped at step {self.step}; continue with --resume", file=sys.stderr)
        assert last_saved == self.step or self.step == 0
        return self.history

    def _eval_and_log(self, bar) -> None:
        metrics = self.evaluate()
        if self.log and metrics:
            self.log.log_eval({"step": self.step, **metrics})
        if self.log and not metrics:
            self.log.plot()
        if self.dist.is_main and metrics:
            bar.write(f"step {self.step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def save_final(self, folder: str | os.PathLike, tokenizer=None) -> None:
        """The trained model as a ``from_pretrained`` folder (plus the tokenizer), written atomically."""
        state = D.full_model_state(self.model) if (self.dist.is_main or D.is_sharded(self.model)) else None
        if self.dist.is_main:
            folder = Path(folder)
            tmp = folder.with_name(f".tmp-{folder.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(str(tmp), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            save_run_config(self.cfg, tmp / "run.yaml")
            shutil.rmtree(folder, ignore_errors=True)
            os.rename(tmp, folder)
        D.barrier()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to silently mix a new run into an old one."""
    has_ckpt = latest_checkpoint(out) is not None
    if has_ckpt and not resume:
        if not overwrite:
            raise ValueError(
                f"{out} already holds checkpoints of a run: pass --resume to continue it, --overwrite to "
                "start over (its checkpoints and logs are deleted), or choose another --out"
            )
        for name in ("checkpoints", "tb", "train.csv", "eval.csv", "loss.png", "final"):
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ pretrain
def _add_common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument(
        "--config", metavar="RUN.yaml", help="run config (sections model/data/optim/schedule/train)"
    )
    p.add_argument("--out", default=default_out, metavar="DIR", help=f"run folder (default {default_out})")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/latest")
    p.add_argument("--overwrite", action="store_true", help="start over in a DIR that holds an earlier run")
    p.add_argument("--peak-tflops", type=float, metavar="T", help="peak TFLOP/s of one device, for MFU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.max_steps=300 optim.lr=1e-3 model.d_model=256",
    )


def _run_config(args, base: dict | None = None) -> RunConfig:
    overrides = list(args.overrides)
    if getattr(args, "preset", None):
        overrides.insert(0, f"model.preset={args.preset}")
    cfg = load_run_config(args.config, overrides, base=base)
    if args.peak_tflops:
        cfg.train.peak_tflops = args.peak_tflops
    return cfg


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def add_train_commands(subparsers) -> None:
    """Register ``fat5 pretrain`` and ``fat5 finetune``."""
    from .finetune import add_finetune_command
    from .pretrain import add_pretrain_command

    add_pretrain_command(subparsers)
    add_finetune_command(subparsers)
