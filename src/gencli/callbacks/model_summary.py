"""ModelSummary: the parts of the model and their parameter counts, without columns that do not apply.

Lightning's Rich summary adds a FLOPs column and a ``Total FLOPs: 0`` line: it counts FLOPs only by running
``example_input_array``, which generative families have no single one of (a GAN's generator takes latents, its
discriminator images), so every gencli run printed zeros. The Mode column (train/eval per module) says nothing
before training starts. What is left is what a reader checks: each part, its type, its parameters, and the totals.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count


class ModelSummary(RichModelSummary):
    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        from rich import get_console
        from rich.table import Table

        columns = dict(summary_data)
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        table.add_column(" ", style="dim")
        for name in ("Name", "Type", "Params"):
            table.add_column(name, justify="right" if name == "Params" else "left", no_wrap=name == "Name")
        for row in zip(columns[" "], columns["Name"], columns["Type"], columns["Params"]):
            table.add_row(*row)
        frozen = total_parameters - trainable_parameters
        table.caption = (f"{get_human_readable_count(trainable_parameters)} trainable parameters"
                         + (f", {get_human_readable_count(frozen)} not trained by an optimiser (EMA copies, frozen parts)" if frozen
                            else "") + f"; {model_size:.1f} MB")
        get_console().print(table)
