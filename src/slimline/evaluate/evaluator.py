"""``evaluate``: measure a model (and optionally its baseline) the way MEASURING.md says.

Order of work, so that one measurement does not disturb the next: static figures (size,
params, sparsity, FLOPs), then latency (warm-up, interleaved runs), one quality pass over the
data, energy, and last what writes files: each model is saved once with ``slimline.save``
into a temporary directory, for its size on disk and for its peak memory, measured in a
process of its own that loads the saved model (``evaluate/isolated.py``; where a model cannot
be rebuilt there, both models are measured in this process and the report says why).
Everything runs in eval mode under ``torch.inference_mode()`` with the requested thread count;
the models' training flags and the thread count are restored afterwards.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

from slimline.core.batches import (
    Batch,
    batch_size,
    forward,
    materialize,
    output_tensor,
    split_labels,
    to_device,
)
from slimline.evaluate import bench, energy, footprint, generation, quality
from slimline.evaluate.conditions import machine_conditions
from slimline.evaluate.report import Report

if TYPE_CHECKING:
    from slimline.export.runtime import ExportedModel

METRICS: tuple[str, ...] = (
    "latency", "throughput", "generation", "memory", "size", "flops", "energy",
    "perplexity", "accuracy", "cosine", "kl", "agreement",
)  # fmt: skip
_ALWAYS = ("latency", "throughput", "memory", "size", "flops")


def evaluate(
    model: nn.Module,
    data: Iterable[Batch],
    metrics: Sequence[str] | None = None,
    baseline: nn.Module | None = None,
    *,
    threads: int | None = None,
    runs: int = 10,
    warmup: int = 2,
    carbon_intensity_g_per_kwh: float | None = None,
    country_iso_code: str = energy.DEFAULT_COUNTRY,
    progress: bool = False,
) -> Report:
    """Measure ``model`` on ``data`` and, when given, ``baseline`` beside it.

    ``data``: batches as for calibration (dict of tensors, tensor, or tuple of tensors).
    ``metrics``: names from :data:`METRICS`; ``None`` means every one that applies (quality
    metrics by the model's output, ``energy`` when codecarbon is installed). Latency,
    memory and FLOPs use the first batch; quality and energy use all of them. Peak memory
    is each model's own, measured in a child process that loads it from a ``save``;
    ``conditions["peak_memory_method"]`` says "own process", or "shared process" (with a
    note why) where a model cannot be rebuilt there.
    ``threads``: ``torch.set_num_threads`` while measuring (default: the current count).
    ``carbon_intensity_g_per_kwh``: grid intensity for CO2; ``None`` uses codecarbon's
    offline figure for ``country_iso_code``. The models are not modified.
    """
    asked = _check_metrics(metrics, has_baseline=baseline is not None)
    _check_settings(threads=threads, runs=runs, warmup=warmup)
    batches = materialize(data, where="data")
    if not batches:
        raise ValueError("data: no batches to evaluate on (the iterable was empty)")
    models = {"baseline": baseline, "model": model} if baseline is not None else {"model": model}
    with ExitStack() as stack:
        used_threads = stack.enter_context(_thread_count(threads))
        stack.enter_context(_eval_mode(models.values()))
        steps = stack.enter_context(_steps(progress))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slimline-eval-")))
        run = _Run(models, batches, used_threads, runs=runs, warmup=warmup, steps=steps,
                   workdir=workdir)
        with torch.inference_mode():
            chosen = run.choose_metrics(asked)
            run.measure(chosen, carbon_intensity_g_per_kwh, country_iso_code)
        if "memory" in chosen:
            run.measure_memory()
        if "size" in chosen:
            run.measure_disk()
        return run.report(chosen)


def _check_metrics(metrics: Sequence[str] | None, *, has_baseline: bool) -> list[str] | None:
    if metrics is None:
        return None
    if isinstance(metrics, str):
        raise TypeError(f"metrics: expected a list of names, got the string {metrics!r}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; valid metrics are {list(METRICS)}")
    pairwise = [m for m in metrics if m in quality.PAIRWISE_METRICS]
    if pairwise and not has_baseline:
        raise ValueError(f"metrics: {pairwise} compare against a baseline; pass baseline=")
    return [m for m in METRICS if m in metrics]


def _check_settings(*, threads: int | None, runs: int, warmup: int) -> None:
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")


class _Run:
    """The state of one evaluate call: models, their devices, batches, figures so far."""

    def __init__(
        self, models: Mapping[str, nn.Module], batches: list[Batch], threads: int, *,
        runs: int, warmup: int, steps: Callable[[str], None], workdir: Path,
    ) -> None:
        self.models = dict(models)
        self.devices = {name: _device_of(m) for name, m in models.items()}
        self.batches = batches
        self.first = {name: to_device(batches[0], dev) for name, dev in self.devices.items()}
        self.threads, self.runs, self.warmup, self.step = threads, runs, warmup, steps
        self.figures: dict[str, dict[str, Any]] = {name: {} for name in models}
        self.methods: dict[str, Any] = {}
        self.notes: list[str] = []
        self.kind: quality.OutputKind | None = None
        self.workdir = workdir
        self.saved: dict[str, Path | Exception] = {}
        self.memory_method: str | None = None

    def choose_metrics(self, asked: list[str] | None) -> list[str]:
        """Probe one forward per model; the metrics to compute (ValueError if one can't)."""
        self.step("probing outputs")
        outputs = {n: forward(m, self.first[n]) for n, m in self.models.items()}
        for name, out in outputs.items():
            quality.check_finite(name, output_tensor(out, split_labels(self.first[name])[0]))
        self.kind = kind = quality.detect_kind(self.models["model"], self.first["model"],
                                               outputs["model"])
        usable = quality.applicable_metrics(kind, has_baseline="baseline" in self.models)
        if asked is None:
            extra = ["energy"] if _energy_available() else []
            # decode speed by default where speculation is what the model changed, or where
            # the model runs in a decoding runtime (llama.cpp); if every model generates
            if any(hasattr(m, generation.STATS_ATTR) or (_is_exported(m) and m.can_generate())
                   for m in self.models.values()) \
                    and all(generation.can_generate(m) for m in self.models.values()):
                extra.append("generation")
            return [m for m in METRICS if m in (*_ALWAYS, *extra, *usable)]
        for metric in asked:
            if metric in quality.QUALITY_METRICS and metric not in usable:
                raise ValueError(quality.why_not_applicable(metric, kind))
        if "generation" in asked:
            cannot = [n for n, m in self.models.items() if not generation.can_generate(m)]
            if cannot:
                raise ValueError(f"metrics: generation needs causal LMs that generate; "
                                 f"{', '.join(cannot)} cannot")
        return asked

    def measure(self, chosen: list[str], intensity: float | None, country: str) -> None:
        if "size" in chosen:
            self.measure_size()
        if "flops" in chosen:
            self.measure_flops()
        if "latency" in chosen or "throughput" in chosen:
            self.measure_latency(chosen)
        if "generation" in chosen:
            self.measure_generation()
        asked_quality = [m for m in chosen if m in quality.QUALITY_METRICS]
        if asked_quality:
            self.measure_quality(asked_quality)
        if "energy" in chosen:
            self.measure_energy(intensity, country)

    def measure_size(self) -> None:
        self.step("counting bytes and parameters")
        for name, model in self.models.items():
            if _is_exported(model):  # the weights live in the runtime's files
                self.figures[name].update(size_bytes_memory=model.weight_bytes(),
                                          params=model.params)
                continue
            self.figures[name].update(
                size_bytes_memory=footprint.size_in_memory(model),
                params=footprint.count_params(model),
                sparsity=footprint.sparsity(model),
            )

    def checkpoint(self, name: str) -> Path:
        """The directory ``slimline.save`` wrote for model ``name`` (saved once), or its error."""
        model = self.models[name]
        if name not in self.saved and _is_exported(model):
            self.saved[name] = model.directory  # already on disk, as it runs
        if name not in self.saved:
            from slimline.core.checkpoint import save  # the method registry: only when saving

            self.step(f"saving {name}")
            try:
                self.saved[name] = save(self.models[name], self.workdir / name)
            except Exception as error:  # reported by each figure that needed the files
                self.saved[name] = error
        found = self.saved[name]
        if isinstance(found, Exception):
            raise found
        return found

    def measure_disk(self) -> None:
        for name in self.models:
            try:
                self.figures[name]["size_bytes_disk"] = footprint.directory_bytes(
                    self.checkpoint(name))
            except Exception as error:  # a model save() cannot write: say so, keep the rest
                self.notes.append(f"size_bytes_disk of {name!r} not measured: "
                                  f"{type(error).__name__}: {error}")
        self.methods["size_bytes_disk"] = "apparent bytes of the files slimline.save writes"

    def measure_flops(self) -> None:
        self.step("counting FLOPs")
        for name, model in self.models.items():
            if _is_exported(model):
                self.notes.append(f"flops of {name!r} not counted: it runs in "
                                  f"{model.format}, outside torch's FLOP counter")
                continue
            try:
                self.figures[name]["flops"] = footprint.count_flops(model, self.first[name])
            except Exception as error:  # e.g. a tensor subclass FlopCounterMode cannot trace
                self.notes.append(f"flops of {name!r} not counted: {type(error).__name__}: "
                                  f"{error}")
        self.methods["flops"] = ("torch.utils.flop_counter.FlopCounterMode, one forward of "
                                 "the first batch; operators without a formula count 0")

    def measure_latency(self, chosen: list[str]) -> None:
        self.step("timing forwards")
        calls = {n: _bound_forward(m, self.first[n]) for n, m in self.models.items()}
        timings = bench.time_interleaved(calls, runs=self.runs, warmup=self.warmup,
                                         sync=_sync_for(self.devices.values()))
        items = batch_size(self.batches[0])
        for name, timing in timings.items():
            if "latency" in chosen:
                self.figures[name].update(latency_ms_median=timing.median_ms,
                                          latency_ms_p95=timing.p95_ms)
            if "throughput" in chosen:
                self.figures[name]["throughput_items_per_s"] = timing.throughput(items)
        order = " ".join(self.models)
        self.methods["latency"] = (f"one forward of the first batch, perf_counter_ns; median "
                                   f"and p95 of {self.runs} runs after {self.warmup} warm-up "
                                   f"rounds, interleaved ({order} per round)")

    def measure_generation(self) -> None:
        self.step("timing greedy generate")
        prompt = generation.prompt_of(self.batches[0])
        figures = generation.measure_generation(self.models, prompt, runs=self.runs,
                                                warmup=self.warmup,
                                                sync=_sync_for(self.devices.values()))
        for name, values in figures.items():
            self.figures[name].update(values)
        self.methods["generation"] = (
            f"greedy generate of {generation.NEW_TOKENS} new tokens (min = max) from the first "
            f"row of the first batch ({prompt.shape[1]} prompt tokens, padding removed); "
            f"median of {self.runs} interleaved runs; acceptance from speculative_stats")

    def measure_memory(self) -> None:
        """Each model's peak in a process of its own; all in this one if any cannot be."""
        from slimline.evaluate import isolated

        self.step("measuring peak memory, each model in its own process")
        try:
            peaks = isolated.measure_all(self.models, self.checkpoint, self.batches[0],
                                         devices=self.devices, threads=self.threads,
                                         workdir=self.workdir / "memory")
        except isolated.NotIsolated as why:
            self._memory_in_this_process(str(why))
            return
        for name, peak in peaks.items():
            self.figures[name].update(peak_memory_bytes=peak.model_bytes,
                                      peak_memory_bytes_process=peak.process_bytes)
        self.memory_method = "own process"
        self.methods["memory"] = isolated.describe(next(iter(peaks.values())))

    def _memory_in_this_process(self, why: str) -> None:
        with torch.inference_mode():
            for name, model in self.models.items():
                peak = bench.peak_memory_during(_bound_forward(model, self.first[name]),
                                                self.devices[name])
                self.figures[name]["peak_memory_bytes"] = peak.bytes
        self.memory_method = "shared process"
        self.methods["memory"] = (f"{peak.method}; one forward of the first batch, in the "
                                  "evaluating process: includes the interpreter, torch and "
                                  "every model held")
        self.notes.append(f"peak memory measured in the evaluating process, not in one per "
                          f"model: {why}")

    def measure_quality(self, asked: list[str]) -> None:
        self.step("quality pass over the data")
        models = {n: (m, self.devices[n]) for n, m in self.models.items()}
        kind = self.kind or quality.OutputKind(causal_lm=False, logits=False, labels=False)
        for name, found in quality.run_quality(models, self.batches, asked, kind).items():
            self.figures[name].update(found)
        if "cosine" in asked:
            self.methods["cosine"] = ("mean over items of the cosine of each item's output, "
                                      "flattened; padded tokens zeroed")
        if "kl" in asked:
            self.methods["kl"] = "KL(baseline ‖ model) in nats, mean per position (token)"

    def measure_energy(self, intensity: float | None, country: str) -> None:
        self.step("measuring energy")
        steps = {n: _one_pass(m, self.batches, self.devices[n]) for n, m in self.models.items()}
        found = energy.measure_energy(
            steps, devices=self.devices, min_seconds=energy.MIN_SECONDS,
            carbon_intensity_g_per_kwh=intensity, country_iso_code=country,
        )
        per = energy.ITEMS_PER_FIGURE
        for name, measured in found.items():
            self.figures[name].update(energy_kwh=measured.kwh_per_item * per,
                                      energy_source=measured.source,
                                      co2_g=measured.co2_g_per_item * per)
        any_one = next(iter(found.values()))
        self.methods["energy"] = {
            "per_items": per,
            "tracking_mode": energy.TRACKING_MODE,
            "rounds": energy.ROUNDS,
            "seconds": {name: m.seconds for name, m in found.items()},
            "items": {name: m.items for name, m in found.items()},
            "hardware": list(any_one.hardware),
            "carbon_intensity_g_per_kwh": _finite_or_none(any_one.carbon_intensity_g_per_kwh),
            "carbon_intensity_source": "stated" if intensity is not None
            else f"codecarbon offline data for {country}",
        }

    def report(self, chosen: list[str]) -> Report:
        first = self.batches[0]
        conditions = machine_conditions(self.devices["model"], self.threads)
        conditions.update(batch_size=batch_size(first))
        seq_len = _seq_len(first)
        if seq_len is not None:
            conditions["seq_len"] = seq_len
        conditions.update(runs=self.runs, warmup=self.warmup, batches=len(self.batches),
                          items=sum(batch_size(b) for b in self.batches), metrics=chosen,
                          methods=self.methods, notes=self.notes)
        if self.memory_method is not None:
            conditions["peak_memory_method"] = self.memory_method
        if "energy" in self.methods:
            conditions["energy_kwh"] = f"kWh per {energy.ITEMS_PER_FIGURE} items"
            conditions["co2_g"] = f"g CO2e per {energy.ITEMS_PER_FIGURE} items"
        return Report(conditions=conditions, models=self.figures)


def _is_exported(model: nn.Module) -> TypeGuard[ExportedModel]:
    """Whether ``model`` is an exported directory run by its runtime (``slimline.export``
    is imported only then: importing it here would rebind ``slimline.export``, see
    ``slimline/__init__``)."""
    if type(model).__name__ != "ExportedModel":
        return False
    from slimline.export.runtime import ExportedModel as Exported

    return isinstance(model, Exported)


def _energy_available() -> bool:
    return importlib.util.find_spec("codecarbon") is not None


def _bound_forward(model: nn.Module, batch: Batch) -> Callable[[], object]:
    return lambda: forward(model, batch)


def _one_pass(model: nn.Module, batches: list[Batch], device: torch.device) -> Callable[[], int]:
    moved = [to_device(b, device) for b in batches]

    def run() -> int:
        for batch in moved:
            forward(model, batch)
        return sum(batch_size(b) for b in moved)

    return run


def _sync_for(devices: Iterable[torch.device]) -> Callable[[], None] | None:
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    if not cuda:
        return None

    def sync() -> None:
        for device in cuda:
            torch.cuda.synchronize(device)

    return sync


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _seq_len(batch: Batch) -> int | None:
    if isinstance(batch, Mapping) and "input_ids" in batch and batch["input_ids"].dim() >= 2:
        return int(batch["input_ids"].shape[-1])
    return None


def _finite_or_none(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


@contextmanager
def _thread_count(threads: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _eval_mode(models: Iterable[nn.Module]) -> Iterator[None]:
    """Eval mode for the measurement; every module's own training flag restored after."""
    held = list(models)
    flags = [(module, module.training) for model in held for module in model.modules()]
    for model in held:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def _steps(show: bool) -> Iterator[Callable[[str], None]]:
    """A callback naming the current phase; a rich spinner when ``show``."""
    if not show:
        yield lambda _description: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("evaluating", total=None)
        yield lambda description: bar.update(task, description=description)
