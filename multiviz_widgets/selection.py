"""Selection: the one shared state of the Explorer.

Every view observes the Selection and asks the engine for what it needs; a click in any view
changes the Selection (never another view). ``update(**kw)`` sets several traits at once and
fires the observers once the whole change is in place; ``select(**kw)`` is what a click does:
it also applies the linking rules (a new instance clears the clicked unit, a new class target
clears the clicked neuron) unless the call sets those itself.
"""
from __future__ import annotations

import traitlets

#: The trait names, in a stable order (used by ``as_dict``).
FIELDS = ("instance", "target", "neuron", "modality", "unit", "method", "interaction_method")


class Selection(traitlets.HasTraits):
    """What the person looks at now.

    instance: dataset index; target: class index (-1 = the model's predicted class);
    neuron: decision-level neuron (-1 = none); modality/unit: the clicked unit ("" / -1 = none);
    method: the stage-1 method; interaction_method: the stage-2 method.

    n_instances / n_classes (optional): the sizes of the dataset and of the model's classes;
    when given, an instance or a class target out of range is rejected (a ``TraitError`` that
    says the valid range), also when the trait is set directly, and the selection is unchanged.
    """

    instance = traitlets.Int(0)
    target = traitlets.Int(-1)
    neuron = traitlets.Int(-1)
    modality = traitlets.Unicode("")
    unit = traitlets.Int(-1)
    method = traitlets.Unicode("integrated_gradients")
    interaction_method = traitlets.Unicode("second_order")

    def __init__(self, n_instances: int | None = None, n_classes: int | None = None, **kw):
        self.n_instances = None if n_instances is None else int(n_instances)
        self.n_classes = None if n_classes is None else int(n_classes)
        super().__init__(**kw)

    @traitlets.validate("instance")
    def _valid_instance(self, proposal):
        i, n = proposal["value"], self.n_instances
        if n is not None and not 0 <= i < n:
            raise traitlets.TraitError(f"Instance {i} is out of range: the dataset has {n} "
                                       f"instances (0..{n - 1}).")
        return i

    @traitlets.validate("target")
    def _valid_target(self, proposal):
        t, n = proposal["value"], self.n_classes
        if n is not None and not -1 <= t < n:
            raise traitlets.TraitError(f"target {t} is out of range: use -1 (the predicted "
                                       f"class) or a class index 0..{n - 1}.")
        return t

    def update(self, **kw) -> None:
        """Set several traits at once; observers fire after all of them are set."""
        unknown = set(kw) - set(FIELDS)
        if unknown:
            raise ValueError(f"Unknown selection field(s) {sorted(unknown)}; the fields are "
                             f"{list(FIELDS)}.")
        with self.hold_trait_notifications():
            for k, v in kw.items():
                setattr(self, k, v)

    def select(self, **kw) -> None:
        """A click: like ``update`` plus the linking rules.

        ``unit=(modality, index)`` or ``unit=None`` (clear) is accepted besides ``modality=`` /
        ``unit=int``. A change of instance clears the clicked unit, a change of target clears
        the neuron, unless the same call sets them.
        """
        kw = {k: v for k, v in kw.items() if v is not ...}
        if "unit" in kw and (kw["unit"] is None or isinstance(kw["unit"], (tuple, list))):
            u = kw.pop("unit")
            if u is None:
                kw["modality"], kw["unit"] = "", -1
            else:
                if len(u) != 2:
                    raise ValueError(f"unit must be (modality, index) or None, got {u!r}.")
                kw["modality"], kw["unit"] = str(u[0]), int(u[1])
        if kw.get("neuron", 0) is None:
            kw["neuron"] = -1
        if kw.get("target", 0) is None:
            kw["target"] = -1
        for k in ("instance", "target", "neuron", "unit"):
            if k in kw:
                v = kw[k]
                if isinstance(v, bool) or not isinstance(v, (int,)) and not hasattr(v, "__index__"):
                    raise ValueError(f"{k} must be an integer, got {v!r}.")
                kw[k] = int(v)
        if "instance" in kw and kw["instance"] != self.instance and "modality" not in kw:
            kw["modality"], kw["unit"] = "", -1
        if "target" in kw and kw["target"] != self.target and "neuron" not in kw:
            kw["neuron"] = -1
        self.update(**kw)

    @property
    def unit_ref(self) -> tuple[str, int] | None:
        """The clicked unit as (modality, index), or None."""
        return (self.modality, self.unit) if self.modality and self.unit >= 0 else None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in FIELDS}

    def __repr__(self) -> str:
        return "Selection(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in FIELDS) + ")"
