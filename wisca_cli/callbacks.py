"""``WiscaCallback``: the transition at chosen steps of a transformers ``Trainer`` run.

    from wisca_cli import WiscaCallback
    trainer = Trainer(model, args, train_dataset=data, callbacks=[WiscaCallback(at_steps=(1000,))])

It acts in ``on_step_end``: after an optimizer step (not a micro-batch under gradient
accumulation) and before that step's checkpoint is saved, so the saved checkpoint is
already transitioned; on every rank together (FSDP or plain). ``every=k`` means global
steps k, 2k, ... The report goes into ``state.log_history`` as an entry with a ``wisca``
key, and one line is logged. Needs transformers (``pip install 'wisca-cli[training]'``).
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from .live import transition

logger = logging.getLogger("wisca")


class WiscaCallback(TrainerCallback):
    def __init__(self, at_steps=(), every: int | None = None, **transition_options):
        if every is not None and (not isinstance(every, int) or every <= 0):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.at_steps = {int(s) for s in at_steps}
        self.every = every
        self.options = transition_options
        self.reports: list[dict] = []

    def due(self, step: int) -> bool:
        return step in self.at_steps or (self.every is not None and step > 0 and step % self.every == 0)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self.due(state.global_step):
            return control
        report = transition(model, optimizer, **self.options)
        report["step"] = state.global_step
        self.reports.append(report)
        summary = {kind: {k: s[k] for k in ("units", "units_changed", "imbalance_before", "imbalance_after")}
                   for kind, s in report["summary"].items()}
        v = report["verification"]
        state.log_history.append({"step": state.global_step, "wisca": {
            "summary": summary, "verified": None if v is None else v["passed"],
            "identical": None if v is None else v["identical"], "optimizer": report["optimizer"]}})
        line = ", ".join(f"{k} {s['imbalance_before']:.3f} -> {s['imbalance_after']:.3f} "
                         f"({s['units_changed']}/{s['units']} units)" for k, s in summary.items())
        if state.is_world_process_zero:
            logger.warning("wisca transition at step %d: %s; %s", state.global_step, line,
                           "not verified" if v is None else ("bit-identical logits" if v["identical"] else
                                                             "logits within tolerance"))
        return control
