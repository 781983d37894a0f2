"""How `fluxfarm bench` shows its rows: a JSON line each as they come, then tables and the ratios
that the performance claims in docs/benchmarks.md quote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from fluxfarm.worker.tools.bench_rows import BASELINES, STEP_BASELINES, ImageRow, LoraFuseRow, StepRow


class BenchLog:
    """Collects rows, appends each to the JSON-lines file, and prints the tables at the end."""

    def __init__(self, out: Path | None, header: dict[str, Any], console: Console) -> None:
        self.out, self.header, self.console = out, header, console
        self.steps: list[StepRow] = []
        self.images: list[ImageRow] = []
        self.fuses: list[LoraFuseRow] = []
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, row: BaseModel) -> None:
        if isinstance(row, StepRow):
            self.steps.append(row)
        elif isinstance(row, LoraFuseRow):
            self.fuses.append(row)
        else:
            self.images.append(row)  # type: ignore[arg-type]
        line = json.dumps({**self.header, **row.model_dump(mode="json")})
        if self.out is not None:
            with self.out.open("a") as handle:
                handle.write(line + "\n")
        self.console.print(line, highlight=False, soft_wrap=True)

    def ratios(self) -> dict[str, float]:
        """Step times against the bf16 step of the same path, size and batch; images/hour against the baselines."""
        out: dict[str, float] = {}
        bf16 = {(r.path, r.width, r.height, r.batch): r.step_ms for r in self.steps if r.level == "bf16"}
        stock_bf16 = {
            (r.width, r.height, r.batch): r.step_ms for r in self.steps if r.level == "bf16" and r.path == "diffusers"
        }
        for row in self.steps:
            if row.level == "bf16" or row.batch != 1:
                continue
            same = bf16.get((row.path, row.width, row.height, row.batch))
            if same:
                out[f"step {row.level} {row.path} / bf16 {row.path} @{row.width}x{row.height}"] = row.step_ms / same
            stock = stock_bf16.get((row.width, row.height, row.batch))
            if stock and row.path != "diffusers":
                out[f"step {row.level} {row.path} / bf16 diffusers @{row.width}x{row.height}"] = row.step_ms / stock
        same_level = {(r.level, r.path, r.width, r.height, r.batch): r.step_ms for r in self.steps}
        for row in self.steps:
            base_path, plus, lora = row.path.rpartition("+")
            if plus and lora.startswith("lora") and row.batch == 1:
                plain = same_level.get((row.level, base_path, row.width, row.height, row.batch))
                if plain:
                    key = f"step {row.level} {row.path} / {row.level} {base_path} @{row.width}x{row.height}"
                    out[key] = row.step_ms / plain
        for row in self.steps:  # the worker's compiled step against what a user compiles without it
            ours = same_level.get((row.level, "fluxfarm+compile", row.width, row.height, row.batch))
            if row.path in STEP_BASELINES.values() and row.batch == 1 and ours:
                key = f"step {row.level} fluxfarm+compile / {row.level} {row.path} @{row.width}x{row.height}"
                out[key] = ours / row.step_ms
        baselines = {row.name: row for row in self.images if row.name in BASELINES}
        for row in self.images:
            if row.name in baselines:
                continue
            for name, base in baselines.items():
                key = f"images/hour {row.name} batch {row.batch} / {name}"
                out[key] = row.images_per_hour / base.images_per_hour
        return out

    def print_tables(self) -> None:
        if self.steps:
            table = Table(title="transformer step (one forward)")
            for column in ("level", "path", "size", "batch", "ms/step", "ms/image-step", "peak GiB"):
                table.add_column(column, justify="right")
            for r in self.steps:
                table.add_row(
                    r.level, r.path, f"{r.width}x{r.height}", str(r.batch), f"{r.step_ms:.1f}",
                    f"{r.ms_per_image_step:.1f}", _gib(r.peak_gib),
                )  # fmt: skip
            self.console.print(table)
        if self.images:
            table = Table(title="whole images (encode + steps + decode)")
            for column in (
                "config",
                "budget",
                "level",
                "encoders",
                "batch",
                "s/image",
                "images/h",
                "peak GiB",
                "host peak GiB",
                "PSNR vs bf16",
            ):
                table.add_column(column, justify="right")
            for r in self.images:
                psnr = "-" if r.psnr_db_vs_bf16 is None else f"{r.psnr_db_vs_bf16:.1f} dB"
                table.add_row(
                    r.name, "-" if r.budget_gib is None else f"{r.budget_gib:g}", r.level, r.text_encoders,
                    str(r.batch), f"{r.s_per_image:.2f}", f"{r.images_per_hour:.0f}", _gib(r.peak_gib),
                    _gib(r.host_peak_gib), psnr,
                )  # fmt: skip
            self.console.print(table)
        if self.fuses:
            table = Table(title="LoRA fuse (once per LoRA set)")
            for column in ("level", "rank", "layers", "fuse s", "from cache s", "unfuse s"):
                table.add_column(column, justify="right")
            for f in self.fuses:
                table.add_row(
                    f.level,
                    str(f.rank),
                    str(f.layers),
                    f"{f.fuse_s:.1f}",
                    f"{f.cached_fuse_s:.1f}",
                    f"{f.unfuse_s:.1f}",
                )
            self.console.print(table)
        ratios = self.ratios()
        if ratios:
            table = Table(title="ratios")
            table.add_column("what")
            table.add_column("ratio", justify="right")
            for key, value in ratios.items():
                table.add_row(key, f"{value:.2f}x")
            self.console.print(table)
            if self.out is not None:
                with self.out.open("a") as handle:
                    handle.write(json.dumps({**self.header, "kind": "ratios", "ratios": ratios}) + "\n")


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
