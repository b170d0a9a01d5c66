"""Recipe search (``sl.search``): against hand-written recipes, random search, and many workers.

Sections (``--sections``, comma-separated; each rewrites its own part of BENCHMARKS.md):

* ``minilm``: NSGA-II over the registry's space, objectives latency and size on disk,
  constraint cosine ≥ 0.99, ``--trials`` trials measured on validation sentences (calibration:
  train). Then, in one process: fp32, the hand-written recipes of the minilm-cpu section
  (int8_dynamic + compile, smoothquant + compile, half + compile) and the search's fastest
  recipe at cosine ≥ 0.99 (again with ``compile`` appended, as its own row: the registry's
  space holds no ``compile``), timed interleaved on one test batch, cosine on test sentences,
  size on disk; the front's energy rating.
* ``code-llama``: objectives size on disk and perplexity, constraint perplexity ≤ +2 %
  (validation windows); the smallest recipe found beside hand-written rows (rtn int4 g128,
  gptq int4 g128, gptq int3 g128, hqq int3 g128), all scored on test windows in this run; the
  best hand-written row is the smallest within +2 % test perplexity.
* ``random``: the ``minilm`` search again with Optuna's RandomSampler, the same trials, seed,
  data and constraint; hypervolume of both fronts in units of the original (latency ×, size ×,
  one reference point ``--hv-reference`` on both axes).
* ``workers``: a throwaway PostgreSQL cluster (``tests/search/postgres.py``); the minilm search
  with ``--workers-trials`` trials by one worker, by two worker processes (half each), and by
  two of which one is killed (SIGKILL) mid-trial and replaced: trials per worker, wall time,
  the killed trial and its retry.

Studies live in ``--workdir``/search.db: a section run again with the same trial count reads
its study back (``load_search``) instead of searching again, so sections can run in pieces;
``--fresh`` deletes it first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import slimline as sl
from benchmarks.harness import (
    ROOT,
    conditions_line,
    interleaved,
    markdown_table,
    print_table,
    write_section,
)
from benchmarks.minilm_cpu import embeddings
from benchmarks.pruning import test_perplexity
from benchmarks.recovery import describe
from slimline.core.batches import forward
from slimline.evaluate.footprint import size_on_disk
from slimline.models import load_builtin
from slimline.search import SearchResult, load_search, search
from slimline.search.render import (
    energy_cells,
    energy_conditions,
    energy_header,
    front_table,
    recipe_summary,
)
from slimline.search.study import SamplerName

TITLE = "Recipe search"
MINILM_OBJECTIVES, MINILM_CONSTRAINT = ["latency", "size"], "cosine>=0.99"
LM_OBJECTIVES, LM_CONSTRAINT = ["size", "perplexity"], "perplexity<=+2%"
HAND_MINILM: dict[str, list[dict[str, Any]]] = {  # the minilm-cpu section's compiled rows
    "int8_dynamic + compile": [{"method": "int8_dynamic"}, {"method": "compile"}],
    "smoothquant + compile": [{"method": "smoothquant"}, {"method": "compile"}],
    "half + compile": [{"method": "half"}, {"method": "compile"}],
}
HAND_LM: dict[str, list[dict[str, Any]]] = {  # the weight-quant section's best rows
    "rtn int4 g128": [{"method": "rtn", "bits": 4, "group_size": 128}],
    "gptq int4 g128": [{"method": "gptq", "bits": 4, "group_size": 128}],
    "gptq int3 g128": [{"method": "gptq", "bits": 3, "group_size": 128}],
    "hqq int3 g128": [{"method": "hqq", "bits": 3, "group_size": 128}],
}
SECTIONS = ("minilm", "code-llama", "random", "workers")


# --- shared -------------------------------------------------------------------------------------


@dataclass
class Setup:
    """A model and its data: search on ``search_data``, score on ``test``."""

    name: str
    model: nn.Module
    search_data: list[Any]
    calibration: list[Any]
    test: list[Any]


def minilm_setup(args: argparse.Namespace) -> Setup:
    built = load_builtin("minilm", size=args.minilm_size)
    return Setup("minilm", built.model,
                 built.batches("validation", batch_size=args.batch_size, limit=args.search_batches),
                 built.batches("train", batch_size=8, limit=8),  # as the smoothquant rows
                 built.batches("test", batch_size=args.batch_size, limit=args.test_batches))


def lm_setup(args: argparse.Namespace) -> Setup:
    built = load_builtin("code-llama-tiny", size=args.lm_size)
    return Setup("code-llama-tiny", built.model,
                 built.batches("validation", batch_size=8, limit=args.search_batches),
                 built.batches("train", batch_size=8, limit=16),  # as the weight-quant rows
                 built.batches("test", batch_size=16, limit=8))


def storage(args: argparse.Namespace) -> str:
    return f"sqlite:///{args.workdir / 'search.db'}"


def study_name(args: argparse.Namespace, *parts: object) -> str:
    """A study per model, sampler, trial count and space file (``--space``)."""
    space = [f"space-{Path(args.space).stem}"] if args.space else []
    return "-".join(str(p) for p in (*parts, *space))


def searched(setup: Setup, study: str, trials: int, args: argparse.Namespace, *,
             objectives: list[str], constraint: str, sampler: SamplerName = "nsga2",
             runs: int | None = None, warm_start: bool = True
             ) -> tuple[SearchResult, float | None]:
    """The study after ``trials`` trials (run now, or read back); search seconds if run now."""
    url = storage(args)
    try:
        done = len(load_search(url, study).trials)
    except ValueError:
        done = 0
    if done >= trials:
        print(f"{study}: {done} trials stored, read back", flush=True)
        return load_search(url, study), None
    start = time.perf_counter()
    search(setup.model, setup.search_data, calibration=setup.calibration, objectives=objectives,
           constraints=[constraint], trials=trials - done, storage=url, study=study,
           space=args.space, seed=args.seed, runs=runs or args.runs, warmup=1,
           threads=args.threads, sampler=sampler, warm_start=warm_start, progress=args.progress)
    return load_search(url, study), time.perf_counter() - start


def counts_line(found: SearchResult, seconds: float | None) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in found.counts().items())
    spent = f" in {seconds / 60:.1f} min" if seconds is not None else " (read back from the study)"
    return f"Study `{found.study}`: {counts}{spent}."


def front_markdown(found: SearchResult) -> str:
    header, rows = front_table(found)
    title = "Pareto front" if found.feasible else "No trial met the constraint; the closest"
    return f"{title} (figures from each trial, against fp32 timed in the same trial):\n\n" + \
        markdown_table(header, rows)


def timed_calls(models: dict[str, nn.Module], batch: Any) -> dict[str, Callable[[], object]]:
    def bind(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return forward(model, batch)

        return run

    return {name: bind(m) for name, m in models.items()}


def disk_bytes(model: nn.Module) -> int | None:
    try:
        return size_on_disk(model)
    except Exception as exc:  # a model save() cannot write: the table says so
        print(f"size on disk not measured: {type(exc).__name__}: {exc}", flush=True)
        return None


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


# --- minilm: the search against the hand-written recipes -------------------------------------


def minilm_section(args: argparse.Namespace) -> str:
    setup = minilm_setup(args)
    found, seconds = searched(setup, study_name(args, "minilm-nsga2", args.trials), args.trials,
                              args,
                              objectives=MINILM_OBJECTIVES, constraint=MINILM_CONSTRAINT)
    models: dict[str, nn.Module] = {"fp32": setup.model}
    recipes: dict[str, str] = {"fp32": "-"}
    for name, steps in HAND_MINILM.items():
        models[name] = sl.compress(setup.model, {"steps": steps},
                                   calibration=setup.calibration).model
        recipes[name] = describe(steps)
    searched_rows: list[str] = []
    if found.feasible:
        best = found.best(objective="latency").to_dict()
        label = f"search: fastest at {MINILM_CONSTRAINT}"
        variants = [(label, best)]
        if not any(s["method"] == "compile" for s in best["steps"]):
            variants.append((f"{label} + compile", {"steps": [*best["steps"],
                                                              {"method": "compile"}]}))
        for name, recipe in variants:
            models[name] = sl.compress(setup.model, recipe, calibration=setup.calibration).model
            recipes[name] = recipe_summary(recipe)
            searched_rows.append(name)
    reference = embeddings(setup.model, setup.test)
    cosines = {n: _cosine(embeddings(m, setup.test), reference) for n, m in models.items()}
    times = interleaved(timed_calls(models, setup.test[0]), runs=args.bench_runs,
                        warmup=args.bench_warmup)
    sizes = {n: disk_bytes(m) for n, m in models.items()}
    fp32 = times["fp32"].median_ms
    header = ["variant", "recipe", "latency ms", "× fp32", "cosine to fp32 (test)",
              "saved MiB"]
    rows = [[n, f"`{recipes[n]}`", f"{times[n].median_ms:.1f}", f"{times[n].median_ms / fp32:.3f}",
             f"{cosines[n]:.5f}", mib(sizes[n])] for n in models]
    print_table("search: minilm", header, rows)
    verdict = _minilm_verdict(times, cosines, searched_rows)
    parts = [conditions_line(args.threads, batch_size=args.batch_size,
                             search_batches=f"{len(setup.search_data)} validation",
                             trial_runs=args.runs, table_runs=args.bench_runs,
                             test_sentences=sum(int(b["input_ids"].shape[0]) for b in setup.test)),
             counts_line(found, seconds), front_markdown(found),
             "Same run, interleaved (one test batch; cosine of the pooled embeddings on the test "
             "sentences, as the minilm-cpu section):", markdown_table(header, rows), verdict]
    if found.feasible and not args.no_energy:
        parts.append(_energy_part(setup, found))
    return "\n\n".join(parts)


def _cosine(outs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    cos = [torch.nn.functional.cosine_similarity(o, r, dim=-1)
           for o, r in zip(outs, reference, strict=True)]
    return float(torch.cat(cos).mean())


def _minilm_verdict(times: dict[str, Any], cosines: dict[str, float], found: list[str]) -> str:
    ok = [n for n in HAND_MINILM if cosines[n] >= 0.99]
    if not ok:
        return "No hand-written recipe reached cosine ≥ 0.99 on test in this run."
    best = min(ok, key=lambda n: times[n].median_ms)
    if not found:
        return f"Best hand-written at cosine ≥ 0.99: **{best}**. The search found no feasible recipe."
    lines = [f"Best hand-written at cosine ≥ 0.99 (test): **{best}** "
             f"({times[best].median_ms:.1f} ms)."]
    for name in found:
        ratio = times[name].median_ms / times[best].median_ms
        fast = "at least as fast: **yes**" if ratio <= 1.0 else "at least as fast: **no**"
        quality = "≥ 0.99" if cosines[name] >= 0.99 else "**below 0.99**"
        lines.append(f"- {name}: {ratio:.3f}× the best hand-written, {fast}; test cosine "
                     f"{cosines[name]:.5f} ({quality}).")
    return "\n".join(lines)


def _energy_part(setup: Setup, found: SearchResult) -> str:
    from slimline.search import rate_energy

    rating = rate_energy(setup.model, found, setup.search_data, calibration=setup.calibration)
    header, rows = energy_header(), energy_cells(rating)
    print_table("search: minilm energy rating", header, rows)
    return "\n\n".join(["Energy rating of the front:", energy_conditions(rating),
                        markdown_table(header, rows), f"Rule: {rating.rule}"])


# --- code-llama-tiny: smallest on disk within +2 % perplexity ----------------------------------


def lm_section(args: argparse.Namespace) -> str:
    setup = lm_setup(args)
    found, seconds = searched(setup, study_name(args, "code-llama", args.lm_size, args.lm_trials),
                              args.lm_trials, args, objectives=LM_OBJECTIVES,
                              constraint=LM_CONSTRAINT, runs=1)
    variants: dict[str, dict[str, Any]] = {"fp32": {"steps": []}}
    variants.update({n: {"steps": s} for n, s in HAND_LM.items()})
    if found.feasible:
        variants[f"search: smallest at {LM_CONSTRAINT}"] = found.best(objective="size").to_dict()
    scores: dict[str, tuple[float, int | None]] = {}
    for name, recipe in variants.items():
        model = sl.compress(setup.model, recipe, calibration=setup.calibration).model \
            if recipe["steps"] else setup.model
        scores[name] = (test_perplexity(model, setup.test), disk_bytes(model))
        print(f"{name}: perplexity {scores[name][0]:.4f}, {mib(scores[name][1])} MiB", flush=True)
    dense_ppl, dense_size = scores["fp32"]
    header = ["variant", "recipe", "test perplexity", "vs fp32", "saved MiB", "× fp32 saved"]
    rows = [[n, f"`{describe(HAND_LM[n]) if n in HAND_LM else recipe_summary(variants[n])}`",
             f"{p:.4f}", f"{p / dense_ppl - 1:+.2%}",
             mib(b), f"{b / dense_size:.3f}" if b and dense_size else "-"]
            for n, (p, b) in scores.items()]
    print_table("search: code-llama-tiny", header, rows)
    windows = sum(int(b["input_ids"].shape[0]) for b in setup.test)
    return "\n\n".join([
        conditions_line(args.threads, model_size=args.lm_size,
                        search_windows=f"{len(setup.search_data)} batches × 8 validation",
                        test_windows=windows),
        counts_line(found, seconds), front_markdown(found), markdown_table(header, rows),
        _lm_verdict(scores, dense_ppl)])


def _lm_verdict(scores: dict[str, tuple[float, int | None]], dense_ppl: float) -> str:
    def within(name: str) -> bool:
        return scores[name][0] <= dense_ppl * 1.02 and scores[name][1] is not None

    hand = [n for n in HAND_LM if within(n)]
    found = [n for n in scores if n.startswith("search:")]
    if not hand:
        return "No hand-written row stayed within +2 % test perplexity in this run."
    best = min(hand, key=lambda n: scores[n][1] or 0)
    line = f"Best hand-written within +2 % test perplexity: **{best}** ({mib(scores[best][1])} MiB)."
    if not found:
        return line + " The search found no feasible recipe."
    name = found[0]
    ppl, size = scores[name]
    smaller = size is not None and size <= (scores[best][1] or 0)
    return (f"{line} The search's smallest: {mib(size)} MiB, "
            f"{'smaller or equal: **yes**' if smaller else 'smaller or equal: **no**'}; test "
            f"perplexity {ppl / dense_ppl - 1:+.2%} "
            f"({'within +2 %' if within(name) else '**outside +2 % on test**'}).")


# --- random search with the same budget ---------------------------------------------------------


def random_section(args: argparse.Namespace) -> str:
    setup = minilm_setup(args)
    runs: dict[str, tuple[SearchResult, float | None]] = {}
    samplers: dict[str, tuple[SamplerName, bool]] = {  # row: sampler, warm start
        "nsga2": ("nsga2", True), "random": ("random", False),
        "random-warm": ("random", True)}
    for row, (sampler, warm) in samplers.items():
        runs[row] = searched(setup, study_name(args, f"minilm-{row}", args.trials),
                             args.trials, args, objectives=MINILM_OBJECTIVES,
                             constraint=MINILM_CONSTRAINT, sampler=sampler, warm_start=warm)
    ref = args.hv_reference
    header = ["sampler", "trials", "complete", "pruned", "failed", "feasible", "front",
              f"hypervolume (ref {ref}×, {ref}×)"]
    rows, volumes = [], {}
    for name, (found, _) in runs.items():
        c = found.counts()
        volumes[name] = found.hypervolume(ref)
        rows.append([name, len(found.trials), c.get("complete", 0), c.get("pruned", 0),
                     c.get("failed", 0), c["feasible"], len(found.pareto),
                     f"{volumes[name]:.4f}"])
    print_table("search: NSGA-II against random", header, rows)
    winner = max(volumes, key=lambda k: volumes[k])
    best_other = max(v for k, v in volumes.items() if k != "nsga2")
    verdict = (f"**nsga2** has the largest hypervolume ({volumes['nsga2']:.4f} against "
               f"{best_other:.4f})." if volumes["nsga2"] > best_other else
               f"nsga2 ties the best other row ({best_other:.4f})."
               if volumes["nsga2"] == best_other else
               f"**{winner}** has the largest hypervolume — the search did **not** beat "
               "random sampling in this run.")
    return "\n\n".join([
        conditions_line(args.threads, batch_size=args.batch_size, seed=args.seed),
        f"Objectives latency and size on disk as ratios to fp32 (latency timed in each trial "
        f"against fp32, interleaved), constraint {MINILM_CONSTRAINT}; hypervolume of the "
        f"feasible front, bounded by the reference point ({ref}, {ref}) — a recipe counts only "
        f"where it beats {ref}× fp32 on both. Rows: `nsga2` is ``sl.search`` as it ships "
        f"(its first trials each method alone at its defaults, then NSGA-II); `random` is "
        f"plain random search (Optuna's RandomSampler) over the same space; `random-warm` "
        f"takes the same first trials as `nsga2`, then samples at random — what NSGA-II adds "
        f"beyond the warm start.",
        *(counts_line(f, s) for f, s in runs.values()), markdown_table(header, rows), verdict])


# --- workers on PostgreSQL ----------------------------------------------------------------------


def worker_main(args: argparse.Namespace) -> None:
    """One worker process of the ``workers`` section (``--worker-run URL STUDY``)."""
    from slimline.search import study

    study.HEARTBEAT_S, study.GRACE_S = 1, args.grace
    torch.set_num_threads(args.threads)
    setup = minilm_setup(args)
    url, name = args.worker_run
    start = time.perf_counter()
    search(setup.model, setup.search_data, calibration=setup.calibration,
           objectives=MINILM_OBJECTIVES, constraints=[MINILM_CONSTRAINT], trials=args.trials,
           storage=url, study=name, space=args.space, seed=args.seed, worker=args.worker,
           runs=args.runs, warmup=1, threads=args.threads)
    print(json.dumps({"pid": os.getpid(), "search_s": time.perf_counter() - start}), flush=True)


@dataclass
class Worker:
    label: str
    process: subprocess.Popen[str]
    started: float
    log: Path
    ended: float | None = None


def launch(args: argparse.Namespace, url: str, study: str, trials: int, worker: int,
           threads: int, label: str) -> Worker:
    argv = [sys.executable, "-m", "benchmarks.search", "--worker-run", url, study,
            "--trials", str(trials), "--worker", str(worker), "--threads", str(threads),
            "--grace", str(args.grace), "--runs", str(args.runs), "--seed", str(args.seed),
            "--minilm-size", args.minilm_size, "--batch-size", str(args.batch_size),
            "--search-batches", str(args.search_batches),
            *(["--space", args.space] if args.space else [])]
    log = args.workdir / "logs" / f"{study}-{url.rsplit('/', 1)[1]}-{worker}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:  # the child keeps its own descriptor
        process = subprocess.Popen(argv, cwd=ROOT, text=True, stdout=out,
                                   stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return Worker(label, process, time.perf_counter(), log)


def wait_all(workers: list[Worker]) -> float:
    """Seconds from the first start to the last exit; a worker that failed stops the run."""
    for w in workers:
        code = w.process.wait()
        w.ended = w.ended or time.perf_counter()
        if code != 0 and code != -signal.SIGKILL:
            raise RuntimeError(f"worker {w.label} exited {code}: {w.log.read_text()[-2000:]}")
    return max(w.ended or 0 for w in workers) - min(w.started for w in workers)


def by_worker(found: SearchResult, workers: list[Worker]) -> dict[str, dict[str, int]]:
    labels = {str(w.process.pid): w.label for w in workers}
    out: dict[str, dict[str, int]] = {w.label: {} for w in workers}
    for t in found.trials:
        label = labels.get((t.worker or ":").rsplit(":", 1)[1], "?")
        out.setdefault(label, {})[t.state] = out.get(label, {}).get(t.state, 0) + 1
    return out


def workers_section(args: argparse.Namespace) -> str:
    from tests.search import postgres

    why = postgres.why_not()
    if why is not None:
        return f"Not run: {why}."
    total, half = args.workers_trials, args.workers_trials // 2
    if half < 1:
        raise SystemExit("--workers-trials: at least 2 (one per worker)")
    header = ["run", "worker", "threads", "trials asked", "complete", "pruned", "failed",
              "wall s (all workers)", "× one worker"]
    rows: list[list[Any]] = []
    two_threads = max(1, args.threads // 2)
    with postgres.throwaway_cluster() as cluster:
        one_url = cluster.create_database("one")
        one = [launch(args, one_url, "s", total, 0, args.threads, "A")]
        one_wall = wait_all(one)
        rows += _worker_rows("one worker", one, load_search(one_url, "s"), args.threads,
                             [total], one_wall, one_wall)
        two_url = cluster.create_database("two")
        two = [launch(args, two_url, "s", half + (total - 2 * half), 0, two_threads, "A"),
               launch(args, two_url, "s", half, 1, two_threads, "B")]
        two_wall = wait_all(two)
        rows += _worker_rows("two workers", two, load_search(two_url, "s"), two_threads,
                             [total - half, half], two_wall, one_wall)
        kill_url = cluster.create_database("killed")
        killed_rows, note = _killed_run(args, kill_url, total, half, two_threads, one_wall)
        rows += killed_rows
    print_table("search: workers on PostgreSQL", header, rows)
    return "\n\n".join([conditions_line(args.threads, batch_size=args.batch_size, trials=total,
                             grace_s=args.grace),
             "minilm, the `minilm` section's search (NSGA-II, each worker its own `worker` "
             "number); one worker with all threads, two workers with half each; wall time from "
             "the first start to the last exit, model loading included. A killed worker's "
             f"trial is found stale {args.grace} s after its last heartbeat (1 s) by the next "
             "trial any worker starts (the default grace is 180 s; shortened here).",
             markdown_table(header, rows), note])


def _worker_rows(run: str, workers: list[Worker], found: SearchResult, threads: int,
                 asked: list[int], wall: float, one_wall: float) -> list[list[Any]]:
    states = by_worker(found, workers)
    return [[run, w.label, threads, n, states[w.label].get("complete", 0),
             states[w.label].get("pruned", 0), states[w.label].get("failed", 0),
             f"{wall:.0f}", f"{wall / one_wall:.2f}"] for w, n in zip(workers, asked, strict=True)]


def _killed_run(args: argparse.Namespace, url: str, total: int, half: int, threads: int,
                one_wall: float) -> tuple[list[list[Any]], str]:
    """Two workers; B is killed (SIGKILL) during its first trial and replaced by C."""
    a = launch(args, url, "s", total - half, 0, threads, "A")
    b = launch(args, url, "s", half, 1, threads, "B (killed)")
    victim = _kill_mid_trial(url, b)
    c = launch(args, url, "s", half, 2, threads, "C (replaces B)")
    wall = wait_all([a, b, c])
    found = load_search(url, "s")
    rows = _worker_rows("one killed", [a, b, c], found, threads, [total - half, half, half],
                        wall, one_wall)
    if victim is None:
        return rows, "B finished before it could be killed mid-trial: no killed-worker case."
    dead = next(t for t in found.trials if t.number == victim)
    retry = next((t for t in found.trials if t.retry_of == victim), None)
    unfinished = [t.number for t in found.trials if t.state == "running"]
    finished = [t for t in found.trials if t.state != "failed"]
    who = by_pid({str(w.process.pid): w.label for w in (a, b, c)}, retry.worker) if retry else "-"
    note = (f"B was killed (SIGKILL) during its first trial, trial {victim}, once its recipe "
            "was sampled. "
            f"Trial {victim}: {dead.state} ({dead.note}). "
            + (f"Retried as trial {retry.number} by worker {who}, the same recipe: "
               f"{'yes' if retry.recipe == dead.recipe else 'no'}, ending {retry.state}. "
               if retry else "It was **not** retried. ")
            + f"Trials with a result: {len(finished)} of the {total} asked; still running: "
            f"{unfinished or 'none'}.")
    return rows, note


def by_pid(labels: dict[str, str], worker: str | None) -> str:
    return labels.get((worker or ":").rsplit(":", 1)[1], "?")


def _kill_mid_trial(url: str, worker: Worker) -> int | None:
    """SIGKILL ``worker`` once a trial of its own is running with its recipe sampled (the
    number of that trial; None if it exited first)."""
    import optuna

    pid = f":{worker.process.pid}"
    while worker.process.poll() is None:
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
        except KeyError:
            continue
        running = [t for t in trials if t.state.name == "RUNNING" and "recipe" in t.user_attrs
                   and str(t.user_attrs.get("worker", "")).endswith(pid)]
        if running:
            os.kill(worker.process.pid, signal.SIGKILL)
            worker.process.wait()
            worker.ended = time.perf_counter()
            return running[0].number
    worker.ended = time.perf_counter()
    return None


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--trials", type=int, default=60, help="minilm (and random) trials")
    parser.add_argument("--lm-trials", type=int, default=40, help="code-llama-tiny trials")
    parser.add_argument("--workers-trials", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per trial")
    parser.add_argument("--bench-runs", type=int, default=15, help="timed runs in the table")
    parser.add_argument("--bench-warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="minilm sentences per batch")
    parser.add_argument("--search-batches", type=int, default=2, help="validation batches")
    parser.add_argument("--test-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", help="a YAML space file narrowing the searched methods "
                        "(default: the registry's whole space)")
    parser.add_argument("--hv-reference", type=float, default=1.1)
    parser.add_argument("--grace", type=int, default=5, help="workers: heartbeat grace, s")
    parser.add_argument("--minilm-size", choices=["full", "small"], default="full")
    parser.add_argument("--lm-size", choices=["full", "small"], default="full")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-search")
    parser.add_argument("--fresh", action="store_true", help="delete the stored studies first")
    parser.add_argument("--no-energy", action="store_true", help="minilm: no energy rating")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker-run", nargs=2, metavar=("URL", "STUDY"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.worker_run:
        worker_main(args)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        (args.workdir / "search.db").unlink(missing_ok=True)
    full = args.minilm_size == "full"
    sections: dict[str, tuple[Callable[[argparse.Namespace], str], str, bool]] = {
        "minilm": (minilm_section, "minilm against hand-written recipes", full),
        "code-llama": (lm_section, "code-llama-tiny, smallest within +2 % perplexity",
                       args.lm_size == "full"),
        "random": (random_section, "NSGA-II against random search", full),
        "workers": (workers_section, "workers on PostgreSQL", full),
    }
    for name in args.sections.split(","):
        run, title, publish = sections[name]
        body = run(args)
        print(body, flush=True)
        if publish and not args.no_write:
            write_section(f"search-{name}", f"{TITLE}: {title}", body)


if __name__ == "__main__":
    main()
