"""Training step objects: data-based training (Eq. 13) and DKDM distillation (Algorithm 1).

Each is a small loop object with ``step()``, ``state_dict()`` and ``load_state_dict()``; drivers in
``services/`` own the loop, the I/O and the progress display. Randomness is explicit: the pool
draws from its own generator (which samples to take, restart noise) and the teacher from another
(the noise of its ancestral step), so the distributed engine can reproduce this one step for step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from dkdm_core.diffusion import GaussianDiffusion, ModelFn
from dkdm_core.guidance import ConditionalFn, Guidance, both_predictions, combine, conditioned
from dkdm_core.methods.o2mkd import TimestepRouter
from dkdm_core.objective import LossTerms, ObjectiveMode, dkdm_loss, hybrid_loss
from dkdm_core.pool import Lease, NoisePool, PoolInit
from dkdm_core.runtime import CPU_FP32, FrozenTeacher, Runtime, compiled
from dkdm_core.spec import OptimSpec
from dkdm_core.wire import pack, rebuild

# A step's logs stay on the device as tensors (no host synchronisation); ``read_logs`` turns them
# into numbers, once, on the steps that log.
StepLogs = dict[str, torch.Tensor | float]


def read_logs(logs: StepLogs) -> dict[str, float]:
    """Numbers from a step's logs with one device-to-host copy; NaN entries (absent students) dropped."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).tolist() if keys else []  # type: ignore[union-attr]
    out = {k: float(v) for k, v in logs.items() if not isinstance(v, torch.Tensor)}
    out.update({k: v for k, v in zip(keys, values, strict=True) if v == v})
    return out


class EMA:
    """An exponential moving average of a model's weights; samples are drawn from it.

    Warmed up as diffusers' EMAModel and TensorFlow's ExponentialMovingAverage(num_updates) do: update
    n (from 0) uses decay min(decay, (1 + n) / (10 + n)), so the average forgets the random initial
    weights within the first few hundred steps instead of holding (0.999)^n of them (45% after 800
    steps). It reaches the configured decay after 9 / (1 - decay) - 1 updates (8990 for 0.999). The
    count is part of the state, so a resumed run continues with the same decays.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # One multi-tensor lerp instead of a kernel per parameter (the CPU result is the same). The
        # warm-up decay is a Python number from a Python counter: no host read on the device.
        decay = self.current_decay()
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
        self._copy_buffers(model)
        self.updates += 1

    @torch.no_grad()
    def update_by(self, model: nn.Module, weight: torch.Tensor) -> None:
        """ema += weight · (θ - ema) with ``weight`` (= 1 - decay) a device tensor: a recorded CUDA graph
        reads it on every replay, where a Python number would be frozen at recording. The caller fills
        ``weight`` and counts ``updates``."""
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        diffs = torch._foreach_sub([p.detach() for p in model.parameters()], ema_params)
        torch._foreach_mul_(diffs, weight)
        torch._foreach_add_(ema_params, diffs)
        self._copy_buffers(model)

    def _copy_buffers(self, model: nn.Module) -> None:
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "updates" not in state:  # a checkpoint from before the warm-up: its average is already warm
            self.model.load_state_dict(state)
            self.updates = 10**9
            return
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


class Trainer:
    """Optimiser, warm-up, gradient clipping and EMA around one model; subclasses define ``step``.

    ``runtime`` says where and how the student runs (device, precision, compilation); the default is
    fp32 on the CPU. ``forward`` is what the loss runs through: the model, compiled, or a data-parallel
    wrapper; weights, EMA and optimiser state are always the unwrapped model's.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: OptimSpec,
        device: torch.device | str = "cpu",
        runtime: Runtime | None = None,
        recordable: bool = False,
    ) -> None:
        self.runtime = runtime or replace(CPU_FP32, device=torch.device(device))
        self.device = self.runtime.device
        self.model = model.to(self.device).train()
        self.optim = optim
        # ``recordable``: the subclass's whole step can be one CUDA graph (``compile: step``). Not O2MKD's
        # router, which sends samples to their students: data-dependent shapes, nothing to record.
        self.graphed = recordable and self.runtime.graph_step and not isinstance(model, TimestepRouter)
        if not self.graphed:
            self.runtime = self.runtime.without_step()
        # Fused AdamW on a GPU: one kernel for every parameter instead of a handful per parameter.
        # A recorded step reads its learning rate from a device tensor (capturable) filled before each replay.
        fused = True if self.runtime.cuda else None
        lr: float | torch.Tensor = torch.tensor(optim.lr, device=self.device) if self.graphed else optim.lr
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=optim.weight_decay, fused=fused, capturable=self.graphed
        )
        warmup = max(optim.warmup_steps, 1)
        self.lr_factor = lambda s: min(1.0, (s + 1) / warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.ema_weight = torch.zeros((), device=self.device)  # 1 - decay, for recorded steps
        self.ema = EMA(self.model, optim.ema_decay)
        self.steps_done = 0
        self.forward: nn.Module = compiled(self.model, self.runtime)
        # Gradients are clipped per network: each O2MKD student on its own, as if trained alone.
        parts = model.parts if isinstance(model, TimestepRouter) else [model]
        self.clip_groups = [list(p.parameters()) for p in parts]

    def run_student(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The student's output in fp32, its forward pass in the runtime's precision."""
        with self.runtime.autocast():
            out = self.forward(x_t, t) if labels is None else self.forward(x_t, t, labels)
        return out.float()

    def optimizer_step(self, terms: LossTerms) -> StepLogs:
        grad_norm = self._descend(terms)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model)
        self.steps_done += 1
        return {**terms.as_tensors(), "grad_norm": grad_norm, "lr": float(self.scheduler.get_last_lr()[0])}

    def _descend(self, terms: LossTerms) -> torch.Tensor:
        """Gradients of the loss, clipped per network; returns the global gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        norms = [torch.nn.utils.clip_grad_norm_(group, self.optim.grad_clip) for group in self.clip_groups]
        return torch.stack(norms).pow(2).sum().sqrt()

    def recorded_update(self, terms: LossTerms) -> StepLogs:
        """``optimizer_step``'s device work alone, for a recorded step: learning rate and EMA weight
        come from device tensors (``prepare_recorded``), the counters from ``count_recorded``."""
        grad_norm = self._descend(terms)
        self.optimizer.step()
        self.ema.update_by(self.model, self.ema_weight)
        return {**terms.as_tensors(), "grad_norm": grad_norm}

    def prepare_recorded(self) -> None:
        """Before a recorded step runs: this step's learning rate and EMA weight, into their tensors."""
        lr = self.optim.lr * self.lr_factor(self.scheduler.last_epoch)
        group = self.optimizer.param_groups[0]
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:  # a CPU run of the same path (tests): nothing is recorded, a number will do
            group["lr"] = lr
        self.ema_weight.fill_(1.0 - self.ema.current_decay())

    def count_recorded(self) -> dict[str, float]:
        """After a recorded step ran: the Python-side counts ``optimizer_step`` keeps; the next lr."""
        self.scheduler.last_epoch += 1
        self.ema.updates += 1
        self.steps_done += 1
        return {"lr": self.optim.lr * self.lr_factor(self.scheduler.last_epoch)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "steps_done": self.steps_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_done = int(state["steps_done"])


class DataTrainer(Trainer):
    """Standard data-based training with L_hybrid (Fig. 2a): how teachers and baselines are trained.

    With ``labels`` (N,) the model is class-conditional; each label is replaced by ``null_label``
    with probability ``label_dropout`` (classifier-free guidance's joint training, Ho & Salimans Alg. 1).
    """

    def __init__(
        self,
        model: nn.Module,
        diffusion: GaussianDiffusion,
        data: torch.Tensor,
        optim: OptimSpec,
        generator: torch.Generator,
        vlb_weight: float = 0.001,
        device: torch.device | str = "cpu",
        runtime: Runtime | None = None,
        labels: torch.Tensor | None = None,
        label_dropout: float = 0.0,
        null_label: int | None = None,
    ) -> None:
        super().__init__(model, optim, device, runtime)
        if label_dropout > 0 and null_label is None:
            raise ValueError("label dropout needs a null label")
        self.diffusion = diffusion
        self.data = data
        self.generator = generator
        self.vlb_weight = vlb_weight
        self.labels = labels
        self.label_dropout = label_dropout
        self.null_label = null_label

    def _batch_labels(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The batch's labels, some dropped to the null class; drawn after the noise (unconditional: none)."""
        if self.labels is None:
            return None
        labels = self.labels[idx]
        if self.label_dropout > 0 and self.null_label is not None:
            drop = torch.rand(idx.shape, generator=self.generator) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return labels.to(self.device)

    def step(self) -> StepLogs:
        self.runtime.begin_step()
        b = self.optim.batch_size
        idx = torch.randint(0, self.data.shape[0], (b,), generator=self.generator)
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), generator=self.generator)
        noise = torch.randn((b, *self.data.shape[1:]), generator=self.generator)
        labels = self._batch_labels(idx)
        x_start, t, noise = self.data[idx].to(self.device), t.to(self.device), noise.to(self.device)
        x_t = self.diffusion.q_sample(x_start, t, noise)  # (B, C, H, W)
        out = self.diffusion.run_model(conditioned(self.run_student, labels), x_t, t)
        return self.optimizer_step(hybrid_loss(self.diffusion, out, x_start, x_t, t, noise, self.vlb_weight))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


class StepGraph:
    """A training step recorded as one CUDA graph on its fourth call and replayed from then on.

    The first calls run eagerly on a side stream, as recording requires (they create the optimiser's
    state, compile the networks and settle the caching allocator). Recording runs the step's Python
    once without executing its kernels; every call then replays them on the same tensors: weights,
    optimiser state, pool and the generators' device offsets all keep their addresses between steps.
    The logs are the graph's outputs, overwritten by the next replay: read them before it.
    """

    def __init__(self, run: Callable[[], StepLogs], generators: list[torch.Generator], warmup: int = 3) -> None:
        self.run = run
        self.generators = generators
        self.warmup = warmup
        self.graph: Any = None
        self.logs: StepLogs = {}

    def __call__(self) -> StepLogs:
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logs = self.run()
            torch.cuda.current_stream().wait_stream(side)
            return logs
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            for generator in self.generators:  # each replay advances their device offsets
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph):
                self.logs = self.run()
            self.graph = graph
        self.graph.replay()
        return self.logs


@dataclass(frozen=True)
class KnowledgeBatch:
    """What one teacher call yields: the student's inputs, its targets and the denoised samples."""

    x_t: torch.Tensor  # (b, C, H, W)
    t: torch.Tensor  # (b,) chain indices
    teacher_output: torch.Tensor  # (b, k·C, H, W): ε_T (and v_T), in the student's terms (eps_output)
    x_prev: torch.Tensor  # (b, C, H, W): the teacher's one-step-denoised samples
    # (b,) long: the labels the student is given with x_t (some the null class); None: unconditional.
    labels: torch.Tensor | None = None


@dataclass(frozen=True)
class StudentBatch:
    """A knowledge batch as a student needs it: without x̂_{t-1}, which only goes back to the pool.

    What the Ray engine ships to a student rank (x_t and teacher_output possibly in bf16).
    """

    x_t: torch.Tensor  # (b, C, H, W)
    t: torch.Tensor  # (b,)
    teacher_output: torch.Tensor  # (b, k·C, H, W)
    labels: torch.Tensor | None = None  # (b,) long, or None

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled through numpy (``dkdm_core.wire``): a batch crosses two Ray calls on its way to a rank."""
        return rebuild, (StudentBatch, *(pack(x) for x in (self.x_t, self.t, self.teacher_output, self.labels)))


@torch.no_grad()
def teacher_step(
    teacher: ConditionalFn,
    chain: GaussianDiffusion,
    x_t: torch.Tensor,
    t: torch.Tensor,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    labels: torch.Tensor | None = None,
    guidance: Guidance | None = None,
) -> KnowledgeBatch:
    """One no-grad teacher call on the chain: outputs for the student, x̂_{t-1} for the pool.

    The noise is drawn where ``generator`` lives: a CPU generator gives the same noise on any device
    (the CPU and the Ray engine reproduce each other); a device generator draws it on the GPU with no
    host round trip. ``labels``: a class-conditional teacher (see ``conditional_teacher_step``).
    """
    noise = torch.randn(x_t.shape, generator=generator, device=generator.device).to(device)
    x_dev, t_dev = x_t.to(device), t.to(device)
    if labels is not None:
        return conditional_teacher_step(teacher, chain, x_dev, t_dev, noise, labels.to(device), generator, guidance)
    out = chain.run_model(teacher, x_dev, t_dev)
    x_prev = chain.p_sample_step(out, x_dev, t_dev, noise)  # the teacher's own scheduler step
    target = chain.eps_output(out, x_dev, t_dev)  # v / x_0 / σ² teachers: the same step in ε terms
    return KnowledgeBatch(x_t=x_dev, t=t_dev, teacher_output=target, x_prev=x_prev)


def conditional_teacher_step(
    teacher: ConditionalFn,
    chain: GaussianDiffusion,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    guidance: Guidance | None,
) -> KnowledgeBatch:
    """A class-conditional teacher step: the pool moves along the guided trajectory, the student learns
    the teacher's conditional output (and, for a ``null_fraction`` share drawn after the noise, its
    unconditional one under the null label), so a student sampled with the same guidance scale takes
    the teacher's guided steps."""
    model_t = chain.model_timesteps(t)
    if guidance is None or not guidance.needs_unconditional or guidance.null_label is None:
        out = teacher(x_t, model_t, labels)
        x_prev = chain.p_sample_step(out, x_t, t, noise)
        return KnowledgeBatch(x_t=x_t, t=t, teacher_output=chain.eps_output(out, x_t, t), x_prev=x_prev, labels=labels)
    # 1. ε_c and ε_u in one batched call; Eq. (6) of classifier-free guidance moves the pool.
    cond, uncond = both_predictions(teacher, x_t, model_t, labels, guidance.null_label)
    x_prev = chain.p_sample_step(combine(cond, uncond, guidance.scale, x_t.shape[1]), x_t, t, noise)
    target = chain.eps_output(cond, x_t, t)
    if guidance.null_fraction <= 0:
        return KnowledgeBatch(x_t=x_t, t=t, teacher_output=target, x_prev=x_prev, labels=labels)
    # 2. Label dropout for the student: the null label, with the teacher's unconditional output as target.
    drop = torch.rand(labels.shape, generator=generator, device=generator.device).to(labels.device)
    drop = drop < guidance.null_fraction  # (b,)
    target = torch.where(drop.view(-1, *([1] * (target.ndim - 1))), chain.eps_output(uncond, x_t, t), target)
    student_labels = torch.where(drop, torch.full_like(labels, guidance.null_label), labels)
    return KnowledgeBatch(x_t=x_t, t=t, teacher_output=target, x_prev=x_prev, labels=student_labels)


def student_loss(
    student: ModelFn | ConditionalFn,
    chain: GaussianDiffusion,
    batch: KnowledgeBatch | StudentBatch,
    vlb_weight: float,
    mode: ObjectiveMode,
) -> LossTerms:
    """L*_DKDM (Eq. 19) of the student on one knowledge batch; ``chain`` may be the teacher's or the student's."""
    chain = chain.eps_view()  # the student predicts ε whatever the teacher predicts
    out = chain.run_model(conditioned(student, batch.labels), batch.x_t, batch.t)
    return dkdm_loss(chain, out, batch.teacher_output, batch.x_t, batch.t, vlb_weight, mode)


def per_student(model: nn.Module, chain: GaussianDiffusion, t: torch.Tensor, terms: LossTerms) -> StepLogs:
    """An O2MKD router's L*_simple per student (``mse_s0``, ``mse_s1``...); nothing for one student.

    Tensors, NaN for a student with no sample in the batch (``read_logs`` drops those).
    """
    if not isinstance(model, TimestepRouter):
        return {}
    n = len(model.parts)
    owner = model.owner(chain.model_timesteps(t))  # (B,)
    mse = terms.mse.detach()
    sums = torch.zeros(n, dtype=mse.dtype, device=mse.device).index_add_(0, owner, mse)
    counts = torch.bincount(owner, minlength=n).to(mse.dtype)
    means = sums / counts  # NaN where a student owns no sample
    return {f"mse_s{i}": means[i] for i in range(n)}


class Teacher:
    """The teacher half of Algorithm 1: one no-grad teacher step on the chain, as ``Learner`` is the
    student half. ``Distiller`` (one process) and the Ray ``TeacherReplica`` both step through it.

    The network runs in the runtime's precision (``FrozenTeacher``); ``generator`` draws the
    ancestral-step noise; ``evaluations`` counts sample-evaluations (pool initialisation included),
    what the paper's cost comparisons count.
    """

    def __init__(
        self,
        model: nn.Module,
        chain: GaussianDiffusion,
        generator: torch.Generator,
        runtime: Runtime | None = None,
        guidance: Guidance | None = None,
    ) -> None:
        self.runtime = runtime or CPU_FP32
        self.guidance = guidance  # a class-conditional teacher: guidance scale, null label, null share
        self.device = self.runtime.device
        self.model = model.to(self.device).eval().requires_grad_(False)
        # The teacher as it is called: in the runtime's precision, compiled if asked (fp32 CPU: itself).
        self.run = FrozenTeacher(self.model, self.runtime)
        self.chain = chain
        self.generator = generator
        self.evaluations = 0

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One teacher step of (x_t, t): x̂_{t-1}, on the teacher's device."""
        self.evaluations += x_t.shape[0]
        return self.step(x_t, t, labels).x_prev

    def step(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> KnowledgeBatch:
        return teacher_step(self.run, self.chain, x_t, t, self.generator, self.device, labels, self.guidance)

    def init_pool(
        self, pool: NoisePool, teacher_batch_size: int, method: PoolInit = "shuffle", per_trajectory: int = 8
    ) -> int:
        """Spread ``pool`` over the chain (shuffled and dynamic strategies); returns teacher evaluations."""

        def denoise(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:  # DenoiseFn
            return self.denoise(x_t, t, labels).to(pool.device)

        return pool.initialise(denoise, teacher_batch_size, method, per_trajectory)

    def teach(self, lease: Lease) -> KnowledgeBatch:
        """One teacher call on a lease: the student's targets and the pool's replacements."""
        self.evaluations += lease.ids.numel()
        return self.step(lease.x_t, lease.t, lease.labels)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_generator": self.generator.get_state(), "teacher_calls": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["teacher_generator"])
        self.evaluations = int(state["teacher_calls"])


class Distiller(Trainer):
    """Algorithm 1 in one process: take a subset, one teacher step, learn from it, put it back."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        chain: GaussianDiffusion,
        pool: NoisePool,
        optim: OptimSpec,
        teacher_generator: torch.Generator,
        vlb_weight: float = 0.001,
        mode: ObjectiveMode = "dkdm",
        device: torch.device | str = "cpu",
        runtime: Runtime | None = None,
        guidance: Guidance | None = None,
    ) -> None:
        # A pool on the GPU makes the whole step device work: recordable as one CUDA graph.
        super().__init__(student, optim, device, runtime, recordable=pool.device.type == "cuda")
        self.step_graph: StepGraph | None = None
        self.teaching = Teacher(teacher, chain, teacher_generator, self.runtime, guidance)
        self.chain = chain
        self.pool = pool
        self.vlb_weight = vlb_weight
        self.mode: ObjectiveMode = mode

    @property
    def teacher(self) -> nn.Module:
        return self.teaching.model

    @property
    def teacher_calls(self) -> int:
        """Teacher sample-evaluations, shuffle denoise included."""
        return self.teaching.evaluations

    def init_pool(self, teacher_batch_size: int, method: PoolInit = "shuffle", per_trajectory: int = 8) -> int:
        """Spread the pool over the chain (shuffled and dynamic strategies); returns teacher evaluations."""
        return self.teaching.init_pool(self.pool, teacher_batch_size, method, per_trajectory)

    def teach(self, lease: Lease) -> KnowledgeBatch:
        return self.teaching.teach(lease)

    def step(self) -> StepLogs:
        if self.graphed:
            return self.recorded_step()
        self.runtime.begin_step()
        # 1. Algorithm 1 line 4: a random subset of the pool.
        lease = self.pool.take(self.optim.batch_size)
        # 2. One teacher step gives the targets and the denoised replacements (line 8).
        batch = self.teach(lease)
        self.pool.put(lease.lease_id, batch.x_prev)
        # 3. Lines 5-7: L*_DKDM and a gradient step (O2MKD: each sample trains the student owning its t).
        terms = student_loss(self.run_student, self.chain, batch, self.vlb_weight, self.mode)
        return {**self.optimizer_step(terms), **per_student(self.model, self.chain, batch.t, terms)}

    def device_step(self) -> StepLogs:
        """``step``'s device work alone, what a recorded step replays: no Python counter moves here."""
        lease = self.pool.take(self.optim.batch_size)
        batch = self.teaching.step(lease.x_t, lease.t, lease.labels)
        self.pool.put(lease.lease_id, batch.x_prev)
        terms = student_loss(self.run_student, self.chain, batch, self.vlb_weight, self.mode)
        return self.recorded_update(terms)

    def recorded_step(self) -> StepLogs:
        """One step as a replay of the recorded CUDA graph, with the counters ``step`` keeps."""
        if self.step_graph is None:
            self.step_graph = StepGraph(self.device_step, [self.pool.generator, self.teaching.generator])
        self.prepare_recorded()
        logs = self.step_graph()
        self.teaching.evaluations += self.optim.batch_size
        return {**logs, **self.count_recorded()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pool": self.pool.state_dict(), **self.teaching.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pool.load_state_dict(state["pool"])
        self.teaching.load_state_dict(state)


class Learner(Trainer):
    """The student half of Algorithm 1: a gradient step on a knowledge batch made elsewhere.

    ``forward`` is the module the loss runs through: the student itself, or a data-parallel wrapper
    of it whose backward pass averages gradients over ranks. Weights, EMA and optimiser state are
    always those of the unwrapped student, so checkpoints do not depend on how training was sharded.
    """

    def __init__(
        self,
        student: nn.Module,
        chain: GaussianDiffusion,
        optim: OptimSpec,
        vlb_weight: float = 0.001,
        mode: ObjectiveMode = "dkdm",
        device: torch.device | str = "cpu",
        runtime: Runtime | None = None,
    ) -> None:
        super().__init__(student, optim, device, runtime)
        self.chain = chain
        self.vlb_weight = vlb_weight
        self.mode: ObjectiveMode = mode

    def learn(self, batch: KnowledgeBatch | StudentBatch) -> StepLogs:
        self.runtime.begin_step()
        batch = StudentBatch(
            x_t=_fp32_on(batch.x_t, self.device),
            t=batch.t.to(self.device, non_blocking=True),
            teacher_output=_fp32_on(batch.teacher_output, self.device),
            labels=None if batch.labels is None else batch.labels.to(self.device, non_blocking=True),
        )
        terms = student_loss(self.run_student, self.chain, batch, self.vlb_weight, self.mode)
        return {**self.optimizer_step(terms), **per_student(self.model, self.chain, batch.t, terms)}


def _fp32_on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` in fp32: moved first, then cast, so a bf16 batch crosses to the GPU at half
    the bytes (a copy that also converts is converted on the host); a no-op for fp32 on its device."""
    return x.to(device, non_blocking=True).float()
