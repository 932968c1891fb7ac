"""``BudgetCalculator``: for teaching — what Lily's sharing costs and buys, against LoRA."""

from __future__ import annotations

import ipywidgets as W

from .. import plots
from ..analysis.layout import parameter_budget, sharing_layout_from_config
from ..core import LilyConfig, lily_parameter_formula
from ._common import FigurePane, caption, grid, guarded


class BudgetCalculator(W.VBox):
    """Sliders for ``d_in``, ``d_out``, layers, ``r``, ``stride_A``, ``num_B`` → parameter counts,
    rank bounds, the LoRA rank of equal budget, and the sharing diagram. Pure arithmetic: every
    slider move recomputes only the formula."""

    def __init__(self, d_in: int = 384, d_out: int = 384, layers: int = 6, r: int = 8, stride_A: int = 2,
                 num_B: int = 4):
        for name, value in dict(d_in=d_in, d_out=d_out, layers=layers, r=r, stride_A=stride_A, num_B=num_B).items():
            if isinstance(value, bool) or not hasattr(value, "__index__") or value < 1:
                from ..core.errors import InputError

                raise InputError(f"BudgetCalculator: {name} must be an integer ≥ 1, got {value!r}")
        super().__init__()
        def slider(v, lo, hi, name, tip, step=1):
            return W.IntSlider(value=v, min=lo, max=hi, step=step, description=name, tooltip=tip,
                               continuous_update=False, style={"description_width": "70px"})

        self.d_in = slider(d_in, 16, 4096, "d_in", "input width of each adapted layer", 16)
        self.d_out = slider(d_out, 16, 4096, "d_out", "output width of each adapted layer", 16)
        self.layers = slider(layers, 1, 48, "layers", "how many layers the group adapts (one router each)")
        self.r = slider(r, 1, 128, "r", "Lily's rank: rows of each A, rows of each B expert")
        self.stride_A = slider(stride_A, 1, 48, "stride_A", "how many consecutive layers share one A")
        self.num_B = slider(num_B, 1, 16, "num_B", "experts in the bank shared by every layer of the group")
        self.counts = W.HTML()
        self.diagram, self.budget = FigurePane(360), FigurePane(420)
        controls = [self.d_in, self.d_out, self.layers, self.r, self.stride_A, self.num_B]
        self.children = [W.HBox([W.VBox(controls[:3]), W.VBox(controls[3:])], layout=W.Layout(flex_flow="row wrap")),
                         self.counts, grid(self.diagram.box, self.budget.box, min_width=600), caption(
                             "<b>The diagram:</b> who shares what — each layer (a site with its own router) uses one A "
                             "shared with its stride_A neighbours, and every router mixes the one bank of B experts. "
                             "<b>The curves:</b> Lily's trainable parameters against LoRA of the same r, and the rank "
                             "one layer's update can reach: Lily ≤ r, LoRA with Lily's budget ≤ its rank.")]
        for c in controls:
            c.observe(lambda _: self.redraw(), "value")
        self.redraw()

    def numbers(self) -> dict:
        L, d_in, d_out, r = self.layers.value, self.d_in.value, self.d_out.value, self.r.value
        stride, E = self.stride_A.value, self.num_B.value
        lily = lily_parameter_formula(L, d_in, d_out, r, stride, E)
        per_rank = L * (d_in + d_out)
        return {"lily": lily, "n_A": -(-L // stride), "lora_same_r": r * per_rank,
                "lora_rank": lily // per_rank, "rank_bound": min(r, d_in, d_out),
                "lora_rank_bound": min(lily // per_rank, d_in, d_out)}

    def redraw(self) -> None:
        n = self.numbers()
        self.counts.value = (
            f"<b>Lily</b>: {n['lily']:,} parameters ({n['n_A']} A, one bank of {self.num_B.value} B, "
            f"{self.layers.value} routers) · ΔW rank ≤ {n['rank_bound']} per layer<br>"
            f"<b>LoRA, same r</b>: {n['lora_same_r']:,} parameters · <b>LoRA of equal budget</b>: "
            f"rank {n['lora_rank']} (ΔW rank ≤ {n['lora_rank_bound']} per layer)")
        config = LilyConfig(["layer"], r=self.r.value, stride_A=self.stride_A.value, num_B=self.num_B.value)
        layout = sharing_layout_from_config(config, self.layers.value, self.d_in.value, self.d_out.value)
        guarded(self.diagram, lambda: plots.plot_sharing_diagram(layout))
        rs = sorted({max(1, self.r.value // 4), max(1, self.r.value // 2), self.r.value, self.r.value * 2,
                     self.r.value * 4})
        budget = parameter_budget(self.d_in.value, self.d_out.value, self.layers.value, rs, self.stride_A.value,
                                  self.num_B.value)
        guarded(self.budget, lambda: plots.plot_parameter_budget(budget))
