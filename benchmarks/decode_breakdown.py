"""Where a batch-1 decode token goes: slimline's packed layers against everything else.

For each row (a slimline packed model built as ``benchmarks/decode.py`` builds it) and in
interleaved rounds:

- **model step**: a bare decode loop (``model(input_ids=token, past_key_values=cache)`` and
  argmax, transformers' dynamic cache, after a ``--prompt``-token prefill), timed per token;
  forward hooks on every ``QuantLinear`` add up the time spent inside them at one row of x
  (the kernel call and its Python around it), so the step splits into *packed layers* and
  *the rest* (norms, rotary, attention, cache, residuals, the framework's Python);
- **layer chain**: the same layers' calls with nothing between them — each layer once, in the
  order the step ran them, on a random one-row x — timed per layer kind, as bytes of weights
  read per second against this machine's streaming read (``slimline.evaluate.bandwidth``).

A row named ``NAME+fast_decode`` is ``NAME`` with slimline's ``fast_decode`` step: its
model step runs the written-out block loop, so the two rows side by side show what that step
takes off *the rest*.

The chain is the kernels' own speed when the weights stream from memory; *the rest* is what a
step costs beyond its matmuls, which llama.cpp's C loop keeps small and which decides how
close a Python decode comes to the bandwidth bound. Speed only: ``llama-1b-random`` has random
weights.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from benchmarks.decode import base_model, prepare
from benchmarks.harness import (
    conditions_line,
    isa_suffix,
    markdown_table,
    print_table,
    write_section,
)
from slimline.evaluate.bandwidth import streaming_read_bandwidth
from slimline.quantize.qlinear import QuantLinear

MiB = 2**20


def layer_bytes(module: QuantLinear) -> int:
    """Bytes a one-row call reads: codes, scales, zero points, bias."""
    tensors = [module.qweight, module.scales, module.zeros, module.bias]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LayerClock:
    """Forward hooks that add up the time inside each packed layer for one-row inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.order: list[str] = []
        self.record_order = False
        self._start: dict[str, float] = {}
        self._handles: list[Any] = []
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                self._handles.append(module.register_forward_pre_hook(self._pre(name)))
                self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if inputs[0].numel() == module.in_features:
                self._start[name] = time.perf_counter()

        return hook

    def _post(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            start = self._start.pop(name, None)
            if start is not None:
                self.seconds[name] += time.perf_counter() - start
                if self.record_order:
                    self.order.append(name)

        return hook

    def reset(self) -> None:
        self.seconds.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def decode_loop(model: nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds per decode step of a bare greedy loop after the prompt's prefill."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / tokens


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class Row:
    """One packed model, its hooks, and its layers in the order a decode step runs them."""

    def __init__(self, name: str, model: nn.Module, prompt: torch.Tensor) -> None:
        self.name, self.model, self.prompt = name, model.eval(), prompt
        self.modules = dict(model.named_modules())
        self.clock = LayerClock(model)
        self.clock.record_order = True
        decode_loop(model, prompt, 1)  # warm-up; records the order of one step
        self.clock.record_order = False
        self.order = list(self.clock.order)
        self.inputs = {n: torch.randn(1, 1, self.modules[n].in_features) for n in set(self.order)}
        self.step: list[float] = []
        self.inside: list[float] = []
        self.chain: dict[str, list[float]] = collections.defaultdict(list)

    def run_step(self, tokens: int) -> None:
        self.clock.reset()
        self.step.append(decode_loop(self.model, self.prompt, tokens))
        self.inside.append(sum(self.clock.seconds.values()) / tokens)

    def run_chain(self) -> None:
        self.clock.remove()  # the chain is timed bare
        per_kind: dict[str, float] = collections.defaultdict(float)
        with torch.no_grad():
            for name in self.order:
                module, x = self.modules[name], self.inputs[name]
                start = time.perf_counter()
                module(x)
                per_kind[kind_of(name)] += time.perf_counter() - start
        for kind, seconds in per_kind.items():
            self.chain[kind].append(seconds)
        self.clock = LayerClock(self.model)

    def kind_bytes(self) -> dict[str, int]:
        out: dict[str, int] = collections.defaultdict(int)
        for name in self.order:
            out[kind_of(name)] += layer_bytes(self.modules[name])
        return out

    def kind_calls(self) -> dict[str, int]:
        return collections.Counter(kind_of(name) for name in self.order)


def tables(rows: list[Row], bandwidth: float) -> tuple[list[str], list[list[Any]], list[str], list[list[Any]]]:
    head = ["row", "tokens/s (bare loop)", "ms/token", "in packed layers ms", "rest ms",
            "rest share", "layer chain ms", "chain GB/s", "chain ÷ streaming read"]  # fmt: skip
    summary, kinds = [], []
    for row in rows:
        step, inside = statistics.median(row.step), statistics.median(row.inside)
        chain = sum(statistics.median(v) for v in row.chain.values())
        total_bytes = sum(row.kind_bytes().values())
        summary.append([row.name, f"{1 / step:.2f}", f"{1e3 * step:.1f}", f"{1e3 * inside:.1f}",
                        f"{1e3 * (step - inside):.1f}", f"{(step - inside) / step:.0%}",
                        f"{1e3 * chain:.1f}", f"{total_bytes / chain / 1e9:.1f}",
                        f"{total_bytes / chain / bandwidth:.0%}"])  # fmt: skip
        calls, nbytes = row.kind_calls(), row.kind_bytes()
        for kind, times in row.chain.items():
            seconds = statistics.median(times)
            kinds.append([row.name, kind, calls[kind], f"{nbytes[kind] / MiB:.1f}",
                          f"{1e3 * seconds:.2f}", f"{1e6 * seconds / calls[kind]:.0f}",
                          f"{nbytes[kind] / seconds / 1e9:.1f}",
                          f"{nbytes[kind] / seconds / bandwidth:.0%}"])  # fmt: skip
    kind_head = ["row", "layer", "calls/token", "MiB/token", "ms/token", "µs/call", "GB/s",
                 "÷ streaming read"]  # fmt: skip
    return head, summary, kind_head, kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b-random", choices=("llama-1b-random", "code-llama-tiny"))
    parser.add_argument("--layers", type=int, default=None, help="llama-1b-random: keep this many blocks")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed a round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="int4,int4-a8",
                        help="packed rows of benchmarks/decode.py; NAME+fast_decode adds the fast_decode step")
    parser.add_argument("--quantize-head", action="store_true", help="quantize the output head too")
    parser.add_argument("--bandwidth-mib", type=int, default=512)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    args.speculative, args.gamma = None, 0  # what benchmarks.decode.prepare reads
    torch.set_num_threads(args.threads)
    reads = streaming_read_bandwidth(args.bandwidth_mib * MiB)
    rows = []
    for name in args.rows.split(","):
        model, prompt = base_model(args)
        rows.append(Row(name, prepare(name, model, args), prompt))
    for _ in range(args.rounds):
        for row in rows:
            row.run_step(args.new_tokens)
            row.run_chain()
    again = streaming_read_bandwidth(args.bandwidth_mib * MiB)
    bandwidth = max(reads.best_bytes_per_s, again.best_bytes_per_s)
    head, summary, kind_head, kinds = tables(rows, bandwidth)
    title = f"Where a decode token goes, {args.model}"
    print_table(title, head, summary)
    print_table("layer chain by kind", kind_head, kinds)
    notes = (f"{conditions_line(args.threads, batch_size=1, prompt=args.prompt, new_tokens=args.new_tokens, rounds=args.rounds)}.\n\n"
             f"Model: {args.model}" + (" — random weights: speed only" if args.model == "llama-1b-random" else "")
             + f". Streaming read (sum of {args.bandwidth_mib} MiB): best {bandwidth / 1e9:.1f} GB/s. "
             "Medians over the rounds. *In packed layers*: time inside the QuantLinear modules during "
             "the model step (forward hooks); *rest*: the step less that; *layer chain*: the same "
             "layers called back to back, nothing between them (the kernels streaming the weights).\n")
    print(notes)
    if not args.no_write:
        body = notes + "\n" + markdown_table(head, summary) + "\n\n" + markdown_table(kind_head, kinds)
        write_section(f"decode-breakdown-{args.model}-{args.threads}t{isa_suffix()}",
                      f"{title}, {args.threads} thread(s)", body)


if __name__ == "__main__":
    main()
