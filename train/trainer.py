"""The lockstep trainer: one batch stream, K SAEs, K optimisers.

Each batch is read, decoded and copied to the device once; every SAE then takes an Adam step on it:
on the batch of its own hook, a transcoder with the batch of its output hook as the target (the
loader's batches of all hooks are the same tokens, row by row).
Per SAE: linear learning-rate warm-up and a linear decay to zero over the last lr_decay_steps,
a linear warm-up of the sparsity coefficient, gradient-norm clipping, and a count of tokens since
each latent last fired (dead = not fired for dead_window_tokens). Nothing waits on the device
between steps: values reach the host only at logging and checkpoint steps, where non-finite losses
are also caught (the step where each SAE first went bad is recorded on the device)."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.errors import UserError
from ..common.outputs import METRICS_FILE
from ..common.progress import log, token_bar
from ..common.seeding import generator

from .checkpoint import atomic_write, encode_checkpoint, load_checkpoint, save_checkpoint, write_error
from .config import SAEConfig, SweepConfig
from .distributed import step_cost
from .loader import ActivationLoader
from .threads import each_on_cores
from .architectures import TrainingSAE, build_sae

AUX_REFRESH_STEPS = 25  # how often the host looks at whether any latent is dead (switches AuxK on)


def output_hook(cfg: SAEConfig) -> str:
    """The hook an SAE reconstructs: a transcoder's hook_out, else the hook it reads."""
    return cfg.hook_out or cfg.hook


def lr_at(cfg: SAEConfig, step: int, n_steps: int) -> float:
    """Learning rate at a step: linear warm-up, constant, then linear decay to zero."""
    lr = cfg.lr
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        lr *= (step + 1) / cfg.lr_warmup_steps
    decay = cfg.lr_decay_steps or 0
    if decay and step >= n_steps - decay:
        lr *= (n_steps - step) / decay
    return lr


def sparsity_factor(cfg: SAEConfig, step: int) -> float:
    """The fraction of the sparsity coefficient in force at a step (linear warm-up from 0)."""
    w = cfg.sparsity_warmup_steps or 0
    return min(1.0, (step + 1) / w) if w else 1.0


@dataclass
class Member:
    """One SAE of the sweep with its optimiser and bookkeeping."""

    cfg: SAEConfig
    sae: TrainingSAE
    opt: torch.optim.Optimizer
    since_fired: torch.Tensor  # int64 [d_sae]: tokens since the latent last fired
    first_bad: torch.Tensor  # int64 scalar: first step with a non-finite loss, -1 if none
    aux_on: bool = False
    metrics_path: Path | None = None

    def state_dict(self) -> dict:
        return {"sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "since_fired": self.since_fired,
                "first_bad": self.first_bad, "aux_on": self.aux_on}

    def load_state_dict(self, st: dict) -> None:
        self.sae.load_state_dict(st["sae"])
        self.opt.load_state_dict(st["opt"])
        self.since_fired.copy_(st["since_fired"])
        self.first_bad.copy_(st["first_bad"])
        self.aux_on = bool(st["aux_on"])


def build_members(cfg: SweepConfig, device: torch.device) -> list[Member]:
    """Fresh SAEs (initialised from the seed and their own name, not their place in the list)."""
    members = []
    for c in cfg.saes:
        sae = build_sae(c, generator(cfg.seed, "init", c.name), device)
        # the fused kernel updates each parameter in one pass (3.6x faster than the default on a CPU
        # for a 576 x 9216 SAE); the optimiser was the largest cost of a small-batch step
        opt = torch.optim.Adam(sae.parameters(), lr=c.lr, betas=(c.adam_beta1, c.adam_beta2),
                               fused=device.type in ("cpu", "cuda"))
        members.append(Member(c, sae, opt, torch.zeros(c.d_sae, dtype=torch.int64, device=device),
                              torch.full((), -1, dtype=torch.int64, device=device)))
    return members


def optimise_member(m: Member, batch: dict[str, torch.Tensor], step: int, n_steps: int, dead: torch.Tensor,
                    aux_on: bool):
    """One optimiser step of one SAE on a batch: the step's learning rate, the loss (forward), the
    backward, the SAE's gradient projection, clipping, the Adam step and the decoder renormalisation.
    Returns (the step's loss output, the learning rate used); the bookkeeping is the caller's."""
    c = m.cfg
    lr = lr_at(c, step, n_steps)
    for group in m.opt.param_groups:
        group["lr"] = lr
    target = {"target": batch[output_hook(c)]} if m.sae.transcoder else {}
    out = m.sae.step_loss(batch[c.hook], sparsity_factor(c, step), dead, aux_on, **target)
    m.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    m.sae.before_optimizer_step()
    if c.grad_clip:
        torch.nn.utils.clip_grad_norm_(m.sae.parameters(), c.grad_clip)
    m.opt.step()
    m.sae.after_optimizer_step()
    return out, lr


def each_member(fn, members: list[Member], device: torch.device, batch_tokens: int) -> list:
    """[fn(m) for m in members], on a CPU the SAEs spread over its cores (train/threads.py), the
    dearest step first."""
    return each_on_cores(fn, members, device, cost=lambda m: step_cost(m.cfg, batch_tokens))


class Trainer:
    """Runs the steps of a sweep, writes metrics and checkpoints under `out`."""

    def __init__(self, cfg: SweepConfig, loader: ActivationLoader, out: Path, device: torch.device,
                 progress: bool = True, checkpoint_dir: Path | None = None):
        self.cfg = cfg
        self.loader = loader
        self.out = Path(out)
        # where checkpoint.safetensors lives: `out`, or a rank's own folder in a distributed sweep
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else self.out
        self.device = device
        self.progress = progress
        self.members = build_members(cfg, device)
        self.step = 0
        self.last_checkpoint_step: int | None = None
        # the checkpoint being written: its file is written and flushed to disk on a thread of its own while
        # training goes on (the state is encoded first, so later steps do not change it)
        self._writer: ThreadPoolExecutor | None = None
        self._writing: tuple[Future, int] | None = None
        self.train_seconds = 0.0
        self.lease = None  # the run folder's lease, checked before every checkpoint replaces the last one
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            (self.out / m.cfg.name).mkdir(parents=True, exist_ok=True)
            m.metrics_path = self.out / m.cfg.name / METRICS_FILE

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, "loader": self.loader.state_dict(),
                "members": {m.cfg.name: m.state_dict() for m in self.members},
                "torch_rng": torch.get_rng_state(), "train_seconds": self.train_seconds}

    def resume(self) -> bool:
        """Continue from out/checkpoint.safetensors if there is one; metrics lines past it are dropped
        (all of them when a run stopped before its first checkpoint: it starts again from step 0)."""
        st = load_checkpoint(self.checkpoint_dir)
        if st is None:
            for m in self.members:
                _truncate_metrics(m.metrics_path, 0)
            return False
        try:
            step = int(st["step"])
            loader_state = st["loader"]
            members = [(m, st["members"][m.cfg.name]) for m in self.members]
            rng = st["torch_rng"]
        except (KeyError, TypeError) as e:
            raise UserError(f"the checkpoint in {self.out} lacks {e}; rerun with --overwrite to start over") from None
        self.loader.load_state_dict(loader_state)
        try:
            for m, ms in members:
                m.load_state_dict(ms)
            torch.set_rng_state(rng)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"the checkpoint in {self.out} does not fit this run's SAEs ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); rerun with --overwrite to start over") from None
        self.step = step
        self.train_seconds = float(st.get("train_seconds", 0.0))
        self.last_checkpoint_step = self.step
        for m in self.members:
            _truncate_metrics(m.metrics_path, self.step)
        log.info(f"resuming at step {self.step} of {self.cfg.n_steps}")
        return True

    def checkpoint(self, wait: bool = True) -> None:
        """Replace the checkpoint with this step's state. wait=False returns once the state is encoded; the
        file is written on a thread while training goes on, and the next checkpoint (or wait_for_checkpoint)
        waits for it and raises its error, if any."""
        self.check_finite()
        self.wait_for_checkpoint()
        data = encode_checkpoint(self.state_dict())
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actcache-checkpoint")
        check = self.lease.check if self.lease is not None else None
        self._writing = (self._writer.submit(save_checkpoint, self.checkpoint_dir, data, check), self.step)
        if wait:
            self.wait_for_checkpoint()

    def wait_for_checkpoint(self) -> None:
        """Wait until the checkpoint being written is on disk (raising its error, if it failed)."""
        if self._writing is not None:
            future, step = self._writing
            self._writing = None
            future.result()
            self.last_checkpoint_step = step

    def check_finite(self) -> None:
        for m in self.members:
            bad = int(m.first_bad)
            if bad >= 0:
                try:
                    self.wait_for_checkpoint()  # so that the message names the last checkpoint on disk
                except UserError:
                    pass
                kept = (f"the last good checkpoint (step {self.last_checkpoint_step}) is kept in {self.out}"
                        if self.last_checkpoint_step is not None else "no checkpoint had been written yet")
                raise UserError(f"SAE {m.cfg.name!r}: the loss became NaN or infinite at step {bad}; training "
                                f"stopped and {kept}; lower its lr or check the store for bad values")

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        cfg, n_steps = self.cfg, self.cfg.n_steps
        every_ckpt = cfg.checkpoint_every_steps
        bar = token_bar(n_steps * cfg.batch_tokens, "train", initial=self.step * cfg.batch_tokens,
                        disable=not self.progress)
        t0 = time.perf_counter()
        try:
            while self.step < n_steps:
                batch = self.loader.next_batches()
                if self.step == 0:
                    for m in self.members:
                        m.sae.init_b_dec(batch[output_hook(m.cfg)])
                logging = self.step % cfg.log_every_steps == 0 or self.step == n_steps - 1
                outs = each_member(lambda m: self._step_member(m, batch), self.members, self.device,
                                   cfg.batch_tokens)
                if logging:
                    self._log(batch, outs)
                self.step += 1
                if self.step % AUX_REFRESH_STEPS == 0:
                    self._refresh_aux()
                if self.step % every_ckpt == 0 and self.step < n_steps:
                    self.train_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.checkpoint(wait=False)
                bar.update(cfg.batch_tokens)
            self.train_seconds += time.perf_counter() - t0
            self.checkpoint()
        except BaseException:
            try:  # whatever stopped training, the checkpoint being written is finished (or fails) first
                self.wait_for_checkpoint()
            except Exception:  # noqa: BLE001  (the error that stopped training is the one to report)
                pass
            raise
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None

    def _step_member(self, m: Member, batch: dict[str, torch.Tensor]):
        step = self.step
        x = batch[m.cfg.hook]
        dead = m.since_fired >= self.cfg.dead_window_tokens
        out, lr = optimise_member(m, batch, step, self.cfg.n_steps, dead, m.aux_on)
        m.since_fired.add_(x.shape[0]).masked_fill_(out.fired, 0)
        bad = ~torch.isfinite(out.loss.detach())
        m.first_bad.copy_(torch.where(bad & (m.first_bad < 0), torch.full_like(m.first_bad, step), m.first_bad))
        out.extra["lr"] = torch.tensor(lr)
        out.extra["dead_fraction"] = dead.float().mean()
        return out

    def _refresh_aux(self) -> None:
        for m in self.members:
            if m.sae.uses_auxk:
                m.aux_on = bool((m.since_fired >= self.cfg.dead_window_tokens).any())
        self.check_finite()

    @torch.no_grad()
    def _log(self, batch: dict[str, torch.Tensor], outs) -> None:
        """One metrics line per SAE; FVU and MSE are of what it reconstructs (a transcoder's output)."""
        self.check_finite()
        centred: dict[str, torch.Tensor] = {}
        for m, out in zip(self.members, outs):
            hook = output_hook(m.cfg)
            x = batch[hook]
            if hook not in centred:
                centred[hook] = (x - x.mean(0)).pow(2).sum()
            err = (out.x_hat - x).pow(2).sum()
            fvu = float(err / centred[hook])
            row = {"step": self.step, "tokens": (self.step + 1) * self.cfg.batch_tokens,
                   "loss": float(out.loss.detach()), **{k: float(v.detach()) for k, v in out.terms.items()},
                   "l0": float(out.l0), "mse": float(err / x.shape[0]), "fvu": fvu, "explained_variance": 1 - fvu,
                   "dead_fraction": float(out.extra["dead_fraction"]), "lr": float(out.extra["lr"]),
                   "sparsity_factor": sparsity_factor(m.cfg, self.step)}
            row.update(m.sae.log_values())
            try:
                with open(m.metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                raise write_error(e, m.metrics_path) from None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines of steps before `step` (the rest are rewritten by the resumed run).

    The file is only ever appended to, so a crash can leave at most its last line half-written; such
    a line (or any line that is not a metrics record) is dropped, not fatal. Rewritten atomically."""
    if not path.is_file():
        return
    raw = path.read_bytes()
    keep = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < step:
            keep.append(line)
    text = "".join(line + "\n" for line in keep).encode()
    if text != raw:
        atomic_write(path, text)
