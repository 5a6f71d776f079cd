"""The suspect zoo: several independently trained suspects per demo attack, for testing and for development.

A defense is judged on more than one trained model of an attack, and its presets are chosen on models it is never
judged on (issue 28). The zoo's manifest (``assets/zoo.json``, committed) names, for each demo attack and the clean
model:

- **test** suspects: the demo bundle's recipe and data (``assets/demo/README.md``) with training seeds 0, 1, 2. Seed
  0 *is* the bundle's suspect (``assets/demo/suspects/NAME``, unchanged); seeds 1 and 2 are built.
- **dev** suspects: the same recipe with other seeds (10, 11, 12) on the ``fashion-mnist-dev`` data source
  (:func:`suspects.data.fashion_mnist_dev_indices`: Fashion-MNIST training images the bundle uses neither for
  training nor testing), so each has its own defense pool and evaluation split, disjoint from the bundle.

Built weights live outside git, in ``assets/zoo/NAME/`` (or ``$BACKDOOR_LENS_ZOO``), one suspect folder each, written
atomically (a folder appears only complete). The manifest records each built suspect's fingerprint
(:func:`suspects.identity.fingerprint`), so a page can name the weights it measured and a rebuild elsewhere can be
checked against them. A suspect is referred to as ``zoo:NAME`` (``zoo:badnets-s1``, ``zoo:clean-dev-s10``), which
:func:`suspects.store.load` resolves.

>>> test_suspects("badnets")          # what the benchmark runs on: ['zoo:badnets-s0', 'zoo:badnets-s1', ...]
>>> build(role="dev", attack="sig")   # builds what is missing, skips what is present
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_folder, write_text
from .store import CARD_FILE, DEMO_SUSPECTS, MODEL_FILE, SuspectLoadError

__all__ = ["ZooEntry", "Zoo", "BuildResult", "ZooBusyError", "SECONDS_PER_SUSPECT", "ROLES", "PREFIX", "MANIFEST", "ZOO_ROOT", "default_zoo", "zoo_path",
           "entries", "test_suspects", "dev_suspects", "current_fingerprint", "known_fingerprints", "test_fingerprints",
           "test_suspect_reason", "build"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MANIFEST = ASSETS / "zoo.json"
ZOO_ROOT = ASSETS / "zoo"
PREFIX = "zoo:"
ROLES = ("test", "dev")
SECONDS_PER_SUSPECT = (240, 530)  # measured, 2 CPU cores: 234-288 s idle (zoo builds), up to 527 s loaded (bundle cards)

# TrainConfig fields a recipe or an attack entry may set (``keep_pool_out`` is the CLI's name for train_on_pool=False)
_TRAIN_KEYS = {"model", "width", "epochs", "batch_size", "lr", "weight_decay", "schedule", "augment", "pool_fraction",
               "keep_pool_out", "max_steps", "device", "attack", "attack_params", "target", "mapping", "poison_rate"}


class ZooBusyError(ValueError):
    """Another build holds the zoo folder."""


@dataclass(frozen=True)
class ZooEntry:
    """One suspect of the zoo: its name, attack, role, training seed and data source, the arguments of
    :class:`suspects.training.TrainConfig` it is trained with, the bundle suspect it is (seed-0 test suspects) and
    the fingerprint the manifest records for it (None until built once)."""

    name: str
    attack: str
    role: str
    seed: int
    data: str
    train: dict[str, Any]
    bundle: str | None = None
    fingerprint: str | None = None
    data_spec: dict[str, Any] | None = None  # the data source's spec when it is more than a name (limits for tests)

    @property
    def ref(self) -> str:
        return PREFIX + self.name

    def config(self, overrides: dict[str, Any] | None = None):
        """The :class:`~suspects.training.TrainConfig` this suspect is trained with (``overrides`` on top)."""
        from .training import TrainConfig

        kw = {**self.train, **(overrides or {})}
        unknown = sorted(set(kw) - _TRAIN_KEYS)
        if unknown:
            raise ValueError(f"zoo recipe of {self.name}: unknown training argument(s) {', '.join(unknown)}")
        keep_out = bool(kw.pop("keep_pool_out", False))
        attack = kw.pop("attack", None)
        return TrainConfig(data=dict(self.data_spec or {"name": self.data}), attack=None if attack in (None, "none", "clean") else attack,
                           train_on_pool=not keep_out, seed=self.seed, name=self.name, **kw)

    def command(self, out: str | os.PathLike) -> str:
        """The ``backdoor-lens train`` command line of this suspect's recipe (what its card records)."""
        kw = dict(self.train)
        args = ["backdoor-lens", "train", "--data", self.data]
        flags = [("model", "--model"), ("width", "--width"), ("epochs", "--epochs"), ("batch_size", "--batch-size"),
                 ("lr", "--lr"), ("weight_decay", "--weight-decay"), ("schedule", "--schedule"),
                 ("augment", "--augment"), ("max_steps", "--max-steps"), ("device", "--device")]
        for key, flag in flags:
            if kw.get(key) is not None:
                args += [flag, str(kw[key])]
        args += ["--seed", str(self.seed)]
        if kw.get("pool_fraction") is not None:
            args += ["--pool-fraction", str(kw["pool_fraction"])]
        if kw.get("keep_pool_out"):
            args.append("--keep-pool-out")
        attack = kw.get("attack") or "none"
        args += ["--attack", attack]
        if attack not in ("none", "clean"):
            for key, value in (kw.get("attack_params") or {}).items():
                args += ["--attack-param", f"{key}={json.dumps(value)}"]
            args += ["--poison-rate", str(kw.get("poison_rate", 0.1)), "--target", str(kw.get("target", 0))]
            if kw.get("mapping", "all-to-one") != "all-to-one":
                args += ["--mapping", str(kw["mapping"])]
        args += ["--out", str(out)]
        return shlex.join(args)


@dataclass
class BuildResult:
    """What :meth:`Zoo.build` did to one suspect: ``built``, ``skipped`` (present), ``would build`` (dry run);
    ``fingerprint`` of the built weights and ``check``: ``recorded`` (the manifest had none; now it has),
    ``matches`` or ``differs`` (from the manifest's; another machine's numerics: recorded as a rebuild unless
    ``record`` is off), ``not recorded`` (a recipe overridden by arguments is never recorded)."""

    name: str
    action: str
    seconds: float = 0.0
    fingerprint: str | None = None
    check: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class Zoo:
    """A manifest (``assets/zoo.json`` by default, ``$BACKDOOR_LENS_ZOO_MANIFEST``) and the folder the built
    suspects live in (``assets/zoo/`` by default, ``$BACKDOOR_LENS_ZOO``)."""

    def __init__(self, manifest: str | os.PathLike | None = None, root: str | os.PathLike | None = None):
        self.manifest_path = Path(manifest or os.environ.get("BACKDOOR_LENS_ZOO_MANIFEST") or MANIFEST).expanduser()
        self.root = Path(root or os.environ.get("BACKDOOR_LENS_ZOO") or ZOO_ROOT).expanduser()
        try:
            self.manifest: dict[str, Any] = json.loads(self.manifest_path.read_text())
        except OSError as err:
            raise SuspectLoadError(f"zoo manifest {self.manifest_path} cannot be read: {err.strerror or err}") from err
        except json.JSONDecodeError as err:
            raise SuspectLoadError(f"zoo manifest {self.manifest_path} is not valid JSON: {err}") from err
        for key in ("recipe", "attacks", "roles"):
            if not isinstance(self.manifest.get(key), dict):
                raise SuspectLoadError(f"zoo manifest {self.manifest_path} lacks {key!r}")

    # --- the entries -------------------------------------------------------------------------------------------

    def entries(self, role: str | None = None, attack: str | None = None) -> list[ZooEntry]:
        """Every suspect of the manifest (role, then attack in the manifest's order, then seed), filtered."""
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown zoo role {role!r}; expected {' or '.join(ROLES)}")
        attacks = self.manifest["attacks"]
        if attack is not None and attack not in attacks:
            raise ValueError(f"no zoo suspects of attack {attack!r}; the zoo has {', '.join(attacks)}")
        recorded = self.manifest.get("fingerprints") or {}
        out = []
        for r in ROLES:
            spec = self.manifest["roles"].get(r)
            if spec is None or (role is not None and r != role):
                continue
            for a, flags in attacks.items():
                if attack is not None and a != attack:
                    continue
                for seed in spec["seeds"]:
                    seed = int(seed)
                    name = f"{a}-s{seed}" if r == "test" else f"{a}-dev-s{seed}"
                    bundle = (f"demo:{a}" if r == "test" and spec.get("bundle_seed") is not None
                              and seed == int(spec["bundle_seed"]) else None)
                    train = {**self.manifest["recipe"], **flags}
                    data = spec["data"] if isinstance(spec["data"], dict) else {"name": str(spec["data"])}
                    out.append(ZooEntry(name, a, r, seed, str(data["name"]), train, bundle, recorded.get(name),
                                        data if set(data) != {"name"} else None))
        return out

    def entry(self, name: str) -> ZooEntry:
        """The entry called ``name`` (``zoo:`` prefix optional); ValueError naming the known ones otherwise."""
        name = name.removeprefix(PREFIX)
        found = next((e for e in self.entries() if e.name == name), None)
        if found is None:
            known = ", ".join(e.name for e in self.entries())
            raise ValueError(f"no zoo suspect {name!r}; the zoo has {known}")
        return found

    def path(self, entry: ZooEntry) -> Path:
        """The suspect folder of ``entry``: the bundle's for a seed-0 test suspect, else under :attr:`root`."""
        return DEMO_SUSPECTS / entry.bundle[5:] if entry.bundle else self.root / entry.name

    def present(self, entry: ZooEntry) -> bool:
        folder = self.path(entry)
        return (folder / CARD_FILE).is_file() and (folder / MODEL_FILE).is_file()

    def built_fingerprint(self, entry: ZooEntry) -> str | None:
        """The fingerprint the built suspect's card records (``card["zoo"]["fingerprint"]``), else None."""
        try:
            card = json.loads((self.path(entry) / CARD_FILE).read_text())
        except (OSError, ValueError):
            return None
        return ((card.get("zoo") or {}).get("fingerprint")) if isinstance(card, dict) else None

    def current_fingerprint(self, entry: ZooEntry) -> str | None:
        """The fingerprint of ``entry``'s weights now: the built suspect's (recomputed from disk), else the one the
        manifest records (None when neither exists). Generated pages compare it with what they measured."""
        if self.present(entry):
            from .identity import ref_fingerprint

            return ref_fingerprint(str(self.path(entry)))
        return entry.fingerprint

    def rebuilds(self, entry: ZooEntry) -> list[dict[str, Any]]:
        """The builds of ``entry`` recorded on other machines whose weights differ from the manifest's fingerprint
        (``manifest["rebuilds"][name]``: fingerprint, machine, date, BA / ASR / RA), oldest first."""
        found = (self.manifest.get("rebuilds") or {}).get(entry.name) or []
        return [r for r in found if isinstance(r, dict) and r.get("fingerprint")]

    def known_fingerprints(self, entry: ZooEntry) -> set[str]:
        """Every fingerprint ``entry``'s weights have had: the manifest's (the first build's), each recorded rebuild's
        and the built suspect's on disk. Builds of one recipe and seed differ only by the machine that summed the
        floats, so a run or scan on any of them is a run on this suspect (its row names which, by fingerprint)."""
        out = {entry.fingerprint} if entry.fingerprint else set()
        out |= {str(r["fingerprint"]) for r in self.rebuilds(entry)}
        now = self.current_fingerprint(entry) if self.present(entry) else None
        return out | ({now} if now else set())

    def describe(self, entry: ZooEntry, verify: bool = False) -> dict[str, Any]:
        """One row of ``backdoor-lens zoo --json``; ``verify`` recomputes the fingerprint of weights on disk
        (``matches``: whether it equals the manifest's)."""
        present = self.present(entry)
        row: dict[str, Any] = {
            "name": entry.name, "ref": entry.ref, "attack": entry.attack, "role": entry.role, "seed": entry.seed,
            "data": entry.data, "fingerprint": entry.fingerprint or (self.built_fingerprint(entry) if present else None),
            "present": present, "path": str(self.path(entry)), "bundle": entry.bundle,
            "command": entry.command(self.path(entry)),
            "rebuilds": [r["fingerprint"] for r in self.rebuilds(entry)],
        }
        if verify:
            from .identity import ref_fingerprint

            found = ref_fingerprint(str(self.path(entry))) if present else None
            row["weights_fingerprint"] = found
            row["matches"] = None if found is None or entry.fingerprint is None else found == entry.fingerprint
        return row

    # --- recording fingerprints ---------------------------------------------------------------------------------

    def record(self, name: str, fp: str) -> None:
        """Write ``fp`` as ``name``'s fingerprint into the manifest (atomically; the rest of it unchanged)."""
        fresh = json.loads(self.manifest_path.read_text())
        fresh.setdefault("fingerprints", {})[name] = fp
        fresh["fingerprints"] = dict(sorted(fresh["fingerprints"].items()))
        write_text(self.manifest_path, json.dumps(fresh, indent=2) + "\n")  # a text file: ends with a newline
        self.manifest = fresh

    def record_rebuild(self, name: str, fp: str, machine: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Add a build of ``name`` whose weights differ from the manifest's fingerprint to ``rebuilds`` (once per
        fingerprint; the manifest's own fingerprint is never replaced), so pages and the benchmark keep counting the
        runs on the first build and count the runs on this one as well."""
        fresh = json.loads(self.manifest_path.read_text())
        if fp == (fresh.get("fingerprints") or {}).get(name):
            return
        listed = fresh.setdefault("rebuilds", {}).setdefault(name, [])
        if any(isinstance(r, dict) and r.get("fingerprint") == fp for r in listed):
            return
        listed.append({"fingerprint": fp, "built": time.strftime("%Y-%m-%d", time.gmtime()),
                       "machine": machine, "metrics": metrics})
        fresh["rebuilds"] = dict(sorted(fresh["rebuilds"].items()))
        write_text(self.manifest_path, json.dumps(fresh, indent=2) + "\n")
        self.manifest = fresh

    # --- building ------------------------------------------------------------------------------------------------

    def build(self, role: str | None = None, attack: str | None = None, only: list[str] | None = None,
              dry_run: bool = False, overrides: dict[str, Any] | None = None, record: bool = True,
              progress: Callable[[float, str, dict], None] | None = None) -> list[BuildResult]:
        """Train every selected suspect that is not present, one after the other, each into its folder atomically
        (a build stopped halfway leaves no folder under the suspect's name, and the next build starts it afresh).

        ``only``: names (``zoo:`` prefix optional). ``overrides``: TrainConfig arguments on top of the manifest's
        recipe (tests: a tiny recipe); such builds are never recorded in the manifest. ``record``: write the
        fingerprint of a newly built suspect into the manifest when it has none (the manifest's own, committed,
        fingerprints are never overwritten: a different one is reported as ``differs`` and added to the manifest's
        ``rebuilds`` of that suspect, :meth:`record_rebuild`).
        """
        selected = self.entries(role, attack)
        if only:
            wanted = [self.entry(n).name for n in only]
            selected = [e for e in selected if e.name in wanted]
        todo = [e for e in selected if not self.present(e)]
        results = [BuildResult(e.name, "skipped", fingerprint=e.fingerprint) for e in selected if self.present(e)]
        tick = progress or (lambda f, m, d: None)
        with contextlib.nullcontext() if dry_run or not todo else self._lock():
            results += self._build(todo, dry_run, overrides, record, tick)
        tick(1.0, "zoo complete" if not dry_run else "dry run", {})
        order = {e.name: k for k, e in enumerate(selected)}
        return sorted(results, key=lambda r: order[r.name])

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One build at a time per folder (an advisory lock the OS drops when the process ends)."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            yield
            return
        with open(self.root / ".build.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise ZooBusyError(f"another zoo build is running in {self.root}; wait for it to finish") from None
            yield

    def _build(self, todo: list[ZooEntry], dry_run: bool, overrides: dict[str, Any] | None, record: bool,
               tick: Callable[[float, str, dict], None]) -> list[BuildResult]:
        from .identity import fingerprint
        from .store import write_suspect_files
        from .training import train_suspect

        results: list[BuildResult] = []
        for i, entry in enumerate(todo):
            if entry.bundle:  # a seed-0 test suspect is the bundle's: never trained here
                raise SuspectLoadError(f"zoo suspect {entry.name} is the demo bundle's {entry.bundle}, whose folder "
                                       f"{self.path(entry)} is missing; restore it from git")
            if dry_run:
                results.append(BuildResult(entry.name, "would build"))
                continue
            cfg = entry.config(overrides)
            cfg.validate()

            def inner(f: float, message: str, metrics: dict, i: int = i, name: str = entry.name) -> None:
                tick((i + min(max(f, 0.0), 1.0)) / len(todo), f"{name} ({i + 1}/{len(todo)}): {message}", metrics)

            t0 = time.time()
            suspect = train_suspect(cfg, None, progress=inner)
            fp = fingerprint(suspect)
            out = self.path(entry)
            suspect.card["name"] = entry.name
            suspect.card["provenance"] = {"source": "backdoor-lens zoo build", "zoo": entry.ref}
            suspect.card["zoo"] = self._card_block(entry, fp, out, overrides)
            with atomic_folder(out, partial=out.with_name(f".{out.name}.partial")) as tmp:
                write_suspect_files(suspect, tmp)
            if overrides:
                check = "not recorded"
            elif entry.fingerprint is None:
                check = "recorded" if record else "not recorded"
                if record:
                    self.record(entry.name, fp)
            else:
                check = "matches" if fp == entry.fingerprint else "differs"
            m = suspect.card.get("metrics") or {}
            metrics = {k: m.get(k) for k in ("ba", "asr", "ra")}
            if check == "differs" and record:
                self.record_rebuild(entry.name, fp, suspect.card["zoo"]["machine"], metrics)
            results.append(BuildResult(entry.name, "built", round(time.time() - t0, 1), fp, check, metrics))
        return results

    def _card_block(self, entry: ZooEntry, fp: str, out: Path, overrides: dict[str, Any] | None) -> dict[str, Any]:
        from .device import machine_info

        train = {**entry.train, **(overrides or {})}
        shown = ZooEntry(entry.name, entry.attack, entry.role, entry.seed, entry.data, train)
        return {"name": entry.name, "ref": entry.ref, "attack": entry.attack, "role": entry.role, "seed": entry.seed,
                "data": entry.data_spec or entry.data, "recipe": train, "overridden": sorted(overrides or {}),
                "command": shown.command(out), "fingerprint": fp,
                "manifest_version": self.manifest.get("version"), "machine": machine_info()}

    # --- test suspects, for refusing them ------------------------------------------------------------------------

    def test_fingerprints(self) -> dict[str, str]:
        """fingerprint -> reference of every test suspect known here: the manifest's records and rebuilds, the built
        test suspects' cards, and the demo bundle's suspects."""
        from .identity import demo_fingerprints

        out = {fp: ref for ref, fp in demo_fingerprints().items()}
        for e in self.entries("test"):
            out.update(dict.fromkeys(self.known_fingerprints(e), e.ref))
        return out


# --- the default zoo, and what the rest of the project calls ----------------------------------------------------


def default_zoo() -> Zoo:
    """The zoo of ``$BACKDOOR_LENS_ZOO_MANIFEST`` / ``$BACKDOOR_LENS_ZOO``, else the repository's."""
    return Zoo()


def zoo_path(ref: str) -> Path:
    """The folder of ``zoo:NAME`` (SuspectLoadError naming how to build it when it is not built)."""
    z = default_zoo()
    try:
        entry = z.entry(ref)
    except ValueError as err:
        raise SuspectLoadError(str(err)) from None
    if not z.present(entry):
        raise SuspectLoadError(f"zoo suspect {entry.name} is not built ({z.path(entry)}); build it with "
                               f"`backdoor-lens zoo build --only {entry.name}`")
    return z.path(entry)


def entries(role: str | None = None, attack: str | None = None) -> list[ZooEntry]:
    """The default zoo's entries (see :meth:`Zoo.entries`)."""
    return default_zoo().entries(role, attack)


def test_suspects(attack: str, present_only: bool = True) -> list[str]:
    """``zoo:NAME`` references of ``attack``'s test suspects (seed order; seed 0 is the bundle's), those built only
    unless ``present_only`` is False: what the defense benchmark runs a cell on. ``attack``: ``badnets``,
    ``blended``, ``sig``, ``wanet`` or ``clean``."""
    z = default_zoo()
    return [e.ref for e in z.entries("test", attack) if not present_only or z.present(e)]


def dev_suspects(attack: str, present_only: bool = True) -> list[str]:
    """``zoo:NAME`` references of ``attack``'s development suspects (what ``scripts/tune_on_dev.py`` tunes on)."""
    z = default_zoo()
    return [e.ref for e in z.entries("dev", attack) if not present_only or z.present(e)]


def current_fingerprint(ref: str) -> str | None:
    """The fingerprint of the zoo suspect ``ref``'s weights now (:meth:`Zoo.current_fingerprint`)."""
    zoo = default_zoo()
    return zoo.current_fingerprint(zoo.entry(ref))


def known_fingerprints(ref: str) -> set[str]:
    """Every fingerprint the zoo suspect ``ref``'s weights have had (:meth:`Zoo.known_fingerprints`)."""
    zoo = default_zoo()
    return zoo.known_fingerprints(zoo.entry(ref))


def test_fingerprints() -> dict[str, str]:
    """fingerprint -> reference of every known test suspect (:meth:`Zoo.test_fingerprints`)."""
    return default_zoo().test_fingerprints()


def test_suspect_reason(ref: str, suspect: Any = None) -> str | None:
    """Why ``ref`` (or the loaded ``suspect``) is a test suspect, or None: a zoo suspect with role ``test``, a demo
    bundle suspect (``demo:NAME`` or its folder), or any weights whose fingerprint is a test suspect's."""
    from .identity import bundle_name, fingerprint, ref_fingerprint

    text = str(ref).strip()
    z = default_zoo()
    if text.startswith(PREFIX):
        entry = z.entry(text)
        if entry.role == "test":
            return f"{entry.ref} is a test suspect of the zoo (role test)"
    if text.startswith("demo:") or bundle_name(text):
        return f"{text} is a demo bundle suspect, the zoo's test suspect of seed 0"
    fp = fingerprint(suspect) if suspect is not None else ref_fingerprint(text)
    known = z.test_fingerprints()
    if fp is not None and fp in known:
        return f"{text} has the weights of the test suspect {known[fp]} (fingerprint {fp})"
    return None


def build(**kwargs: Any) -> list[BuildResult]:
    """:meth:`Zoo.build` on the default zoo."""
    return default_zoo().build(**kwargs)
