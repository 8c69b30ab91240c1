"""Selection: the one shared state of the Explorer.

Every view observes the Selection and asks the engine for what it needs; a click in any view
changes the Selection (never another view). ``update(**kw)`` sets several traits at once and
fires the observers once the whole change is in place; ``select(**kw)`` is what a click does:
it also applies the linking rules (a new instance clears the clicked unit, a new class target
clears the clicked neuron) unless the call sets those itself.

The validators reject a value that does not fit what the Selection was told (the dataset's
size, the classes, the modalities), also when a trait is set directly, and leave the selection
unchanged; their errors are ``traitlets.TraitError``s that are also the usual Python errors
(``IndexError`` for an instance out of range, ``ValueError`` for the rest).
"""
from __future__ import annotations

import traitlets

from .checks import is_integer

#: The trait names, in a stable order (used by ``as_dict``).
FIELDS = ("instance", "target", "neuron", "modality", "unit", "method", "interaction_method",
          "pair")


class SelectionValueError(traitlets.TraitError, ValueError):
    """A value the Selection rejects (a class target out of range, an unknown modality, a bad
    pair)."""


class SelectionIndexError(traitlets.TraitError, IndexError):
    """An instance out of the dataset's range."""


class _Pair(traitlets.TraitType):
    """A (rows, columns) pair of modality names, or None. Unlike ``traitlets.Any``, which
    accepts None without asking the validators, None set directly is validated too."""

    default_value = None
    allow_none = False
    info_text = "a (rows, columns) pair of modality names, or None"

    def validate(self, obj, value):
        # names as strings and a tuple, before the Selection's validator and before traitlets
        # compares old and new (also inside hold_trait_notifications): a list equal to the
        # pair is no change
        return tuple(str(m) for m in value) if isinstance(value, (tuple, list)) else value


def unit_ref_of(u) -> tuple[str, int]:
    """A clicked unit given as (modality, index), checked: a non-empty modality name and a
    non-negative integer index (a float is refused, not truncated); ValueError otherwise."""
    if not isinstance(u, (tuple, list)) or len(u) != 2:
        raise ValueError(f"unit must be (modality, index) or None, got {u!r}.")
    m, i = u
    if not isinstance(m, str) or not m:
        raise ValueError(f"unit must be (modality, index) with a modality's name first, got "
                         f"{u!r}.")
    if not is_integer(i):
        raise ValueError(f"unit index must be an integer, got {i!r}.")
    if int(i) < 0:
        raise ValueError(f"unit index must be non-negative, got {int(i)}.")
    return m, int(i)


class Selection(traitlets.HasTraits):
    """What the person looks at now.

    instance: dataset index; target: class index (-1 = the model's predicted class);
    neuron: decision-level neuron (-1 = none); modality/unit: the clicked unit ("" / -1 = none);
    method: the stage-1 method; interaction_method: the stage-2 method; pair: the two
    modalities (rows, columns) of the interaction heatmap, whose interactions the input view
    and the prediction path's pairs show too (None only where there is none to choose: a
    one-modality model, or a Selection not told the modalities).

    n_instances / n_classes (optional): the sizes of the dataset and of the model's classes;
    when given, an instance or a class target out of range is rejected (an error that says the
    valid range), also when the trait is set directly, and the selection is unchanged.
    modalities (optional): the model's modality names; when given, the clicked unit's modality
    must be one of them and ``pair`` two different ones (default: the first two; a one-modality
    model has no pair).
    """

    instance = traitlets.Int(0)
    target = traitlets.Int(-1)
    neuron = traitlets.Int(-1)
    modality = traitlets.Unicode("")
    unit = traitlets.Int(-1)
    method = traitlets.Unicode("integrated_gradients")
    interaction_method = traitlets.Unicode("second_order")
    pair = _Pair()

    def __init__(self, n_instances: int | None = None, n_classes: int | None = None,
                 modalities=None, **kw):
        self.n_instances = None if n_instances is None else int(n_instances)
        self.n_classes = None if n_classes is None else int(n_classes)
        if isinstance(modalities, str):
            modalities = [modalities]
        self.modalities = None if modalities is None else [str(m) for m in modalities]
        if kw.get("pair") is None and self.modalities is not None and len(self.modalities) > 1:
            kw["pair"] = tuple(self.modalities[:2])   # a model of 2+ modalities has a pair
        super().__init__(**kw)

    @staticmethod
    def _no_bool(proposal) -> None:
        """True is not instance 1 nor class 1 (as ``select`` says too): refused when a trait
        is set directly, where traitlets' Int would take it."""
        if isinstance(proposal["value"], bool):
            name = proposal["trait"].name
            raise SelectionValueError(f"{name} must be an integer, got {proposal['value']!r}.")

    @traitlets.validate("neuron", "unit")
    def _valid_index(self, proposal):
        self._no_bool(proposal)
        v, name = proposal["value"], proposal["trait"].name
        if v < -1:
            raise SelectionValueError(f"{name} must be an index >= 0, or -1 for none; got {v}.")
        if name == "unit" and v >= 0 and not self.modality:
            # a unit index is a unit of the clicked modality: without one, unit_ref would be
            # None while as_dict reported the index (set together, ``update`` checks both
            # once both are set)
            raise SelectionValueError(
                f"unit {v} names no modality: set both, e.g. select(unit=("
                f"{(self.modalities or ['image'])[0]!r}, {v})) or update(modality=..., unit={v}).")
        return v

    @traitlets.validate("instance")
    def _valid_instance(self, proposal):
        self._no_bool(proposal)
        i, n = proposal["value"], self.n_instances
        if n is not None and not 0 <= i < n:
            raise SelectionIndexError(f"Instance {i} is out of range: the dataset has {n} "
                                      f"instances (0..{n - 1}).")
        return i

    @traitlets.validate("target")
    def _valid_target(self, proposal):
        self._no_bool(proposal)
        t, n = proposal["value"], self.n_classes
        if n is not None and not -1 <= t < n:
            raise SelectionValueError(f"target {t} is out of range: use -1 (the predicted "
                                      f"class) or a class index 0..{n - 1}.")
        return t

    @traitlets.validate("modality")
    def _valid_modality(self, proposal):
        m, names = proposal["value"], self.modalities
        if m and names is not None and m not in names:
            raise SelectionValueError(f"unit must be (modality, index) with a modality of "
                                      f"{names}, or None; got modality {m!r}.")
        if not m and self.unit >= 0:
            # no modality with a unit index left behind: clear both (as ``select(unit=None)``)
            raise SelectionValueError(
                f"modality '' would leave unit {self.unit} without its modality: clear the unit "
                f"too, with select(unit=None) or update(modality='', unit=-1).")
        return m

    @traitlets.validate("pair")
    def _valid_pair(self, proposal):
        p, names = proposal["value"], self.modalities
        if p is None and (names is None or len(names) < 2):
            return None                          # none chosen, or none to choose
        if names is not None and len(names) < 2:
            raise SelectionValueError(f"This model has one modality ({names}): there is no "
                                      "pair of modalities to choose.")
        if (not isinstance(p, tuple) or len(p) != 2 or p[0] == p[1]
                or (names is not None and any(m not in names for m in p))):
            of = f" of {names}" if names is not None else ""
            raise SelectionValueError(f"pair must name two different modalities{of} as (rows, "
                                      f"columns), got {p!r}.")
        return p

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
        ``unit=int`` (``modality=""`` alone clears the unit too). A change of instance clears
        the clicked unit, a change of target clears the neuron, unless the same call sets them
        (the unit's index: a modality alone names no unit of the new instance, so it is set with
        no unit; ``unit=int`` alone keeps the clicked modality). Another modality alone clears
        the unit too: the clicked index names a unit of the old modality, not of the new one.
        """
        kw = {k: v for k, v in kw.items() if v is not ...}
        if "unit" in kw and (kw["unit"] is None or isinstance(kw["unit"], (tuple, list))):
            u = kw.pop("unit")
            kw["modality"], kw["unit"] = ("", -1) if u is None else unit_ref_of(u)
        if kw.get("neuron", 0) is None:
            kw["neuron"] = -1
        if kw.get("target", 0) is None:
            kw["target"] = -1
        for k in ("instance", "target", "neuron", "unit"):
            if k in kw:
                v = kw[k]
                if not is_integer(v):
                    raise ValueError(f"{k} must be an integer, got {v!r}.")
                kw[k] = int(v)
        if kw.get("unit", -1) >= 0 and not kw.get("modality", self.modality):
            raise ValueError(f"unit={kw['unit']} names no modality: give unit=(modality, "
                             f"index), e.g. unit=({(self.modalities or ['image'])[0]!r}, "
                             f"{kw['unit']}).")
        if "unit" not in kw and ("instance" in kw and kw["instance"] != self.instance
                                 or "modality" in kw and kw["modality"] != self.modality):
            kw.setdefault("modality", "")
            kw["unit"] = -1
        if "target" in kw and kw["target"] != self.target and "neuron" not in kw:
            kw["neuron"] = -1
        self.update(**kw)

    @property
    def unit_ref(self) -> tuple[str, int] | None:
        """The clicked unit as (modality, index), or None."""
        m, u = self.modality, self.unit
        return (m, u) if m and u >= 0 else None

    def as_dict(self) -> dict:
        """The fields as plain values (``pair`` a list, or None), and ``unit_ref`` (the clicked
        unit as [modality, index], or None)."""
        out = {k: getattr(self, k) for k in FIELDS}
        out["pair"] = list(self.pair) if self.pair else None
        ref = self.unit_ref                   # read once: a worker's blanking may clear it
        out["unit_ref"] = list(ref) if ref else None
        return out

    def __repr__(self) -> str:
        return "Selection(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in FIELDS) + ")"
