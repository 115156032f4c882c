"""Sweep files: a recipe, a baseline, variants (named, grid, random), seeds and a suite.

```yaml
name: recipes                       # optional; default: the file's stem
recipe: train/lit_emoji.yaml        # the base recipe
suite: eval/demo.yaml               # evaluates every finished run (same code as `clipkit eval all`)
seeds: [0, 1, 2]                    # every variant runs once per seed (train.seed)
output: runs/sweeps/recipes         # optional; default runs/sweeps/<name>
overrides: [train.samples=20000]    # optional; every run, baseline included
baseline: {name: demo, overrides: []}   # optional; default: the recipe itself, named "baseline";
                                    # or the name of one of the variants below
variants:                           # named variants: name -> overrides
  views4: [train.cache_views=4]
grid:                               # the Cartesian product of the values, one variant per point
  optim.lr: [1.0e-3, 3.0e-4]
  model.text.unlocked_layers: [0, 2]
random:                             # n variants drawn from a seeded space
  n: 8
  seed: 0
  space:
    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    optim.weight_decay: {uniform: [0.0, 0.2]}
    model.text.unlocked_layers: {int: [0, 4]}       # inclusive
    loss.name: {choice: [clip, siglip]}
metrics: [animal_mnist/acc1, emoji_val/image_retrieval_recall@5, wall_s]   # optional: summary columns
checkpoints: final                  # final (default) | all | none: what a finished run keeps
```

Variants are the baseline, then the named ones, the grid points and the random draws, in that
order (any of the three may be used, alone or together). A run's overrides, in order: the sweep's
``overrides``, the variant's, the command line's, then the keys the sweep owns (``train.seed``,
``train.output_dir``, ``train.run_name``, ``train.resume=latest``), which neither a variant
nor ``overrides`` may set, and ``train.threads`` when ``--parallel`` or ``--threads`` sets it. Relative ``recipe`` and ``suite`` paths are taken
from the working directory when they exist there, else from the sweep file's folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clipkit.config import Config, ConfigError, load_config, replace, to_dict
from clipkit.errors import ClipkitError
from clipkit.registry import suggest

KEYS = (
    "name", "recipe", "suite", "seeds", "output", "overrides", "baseline",
    "variants", "grid", "random", "metrics", "checkpoints",
)  # fmt: skip
OWNED = ("train.seed", "train.output_dir", "train.run_name", "train.resume")
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
CHECKPOINTS = ("final", "all", "none")
TIME_METRICS = ("wall_s", "train_wall_s", "eval_wall_s")


class SweepError(ClipkitError):
    """A sweep file, or a variant of it, that cannot run."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One (variant, seed): trained in ``<output>/runs/<run_id>/`` and evaluated there."""

    variant: str
    seed: int
    run_id: str
    overrides: tuple[str, ...]  # after the recipe, complete (sweep-owned keys last)
    config_hash: str  # of the resolved config, thread count and resume excluded


@dataclass(frozen=True)
class Sweep:
    name: str
    source: Path
    recipe: Path
    suite: Path
    output: Path
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]  # every run: the file's, then (in each run, after the variant's) the CLI's
    cli_overrides: tuple[str, ...]
    variants: tuple[Variant, ...]
    baseline: str
    metrics: tuple[str, ...]  # summary columns; () = the suite's headline metrics and wall_s
    checkpoints: str

    @property
    def runs_dir(self) -> Path:
        return self.output / "runs"


# ----------------------------------------------------------------------------- values


def format_value(value: Any) -> str:
    """The text of ``key=<text>`` that ``clipkit.config.parse_overrides`` reads back as ``value``."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        mantissa, e, exp = text.partition("e")
        if e and "." not in mantissa:  # YAML 1.1 reads "1e-05" as a string, "1.0e-05" as a float
            text = f"{mantissa}.0e{exp if exp[0] in '+-' else '+' + exp}"
        return text
    return json.dumps(value)  # int, bool, null, lists and mappings in flow style


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _override_list(raw: Any, where: str) -> tuple[str, ...]:
    """A list of ``key=value`` strings (one string is a list of one)."""
    items = [raw] if isinstance(raw, str) else raw
    if items is None:
        return ()
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise SweepError(f"{where} must be a list of key=value overrides, got {raw!r}")
    for item in items:
        if "=" not in item:
            raise SweepError(f"{where}: '{item}' is not of the form key=value (e.g. optim.lr=3.0e-4)")
        if _key_of(item) in OWNED:
            raise SweepError(
                f"{where}: '{_key_of(item)}' is set by the sweep for every run ({', '.join(OWNED)}); "
                "list seeds under 'seeds:' and the folder under 'output:'"
            )
    return tuple(items)


# ----------------------------------------------------------------------------- variants


def grid_variants(grid: Any, where: str = "grid") -> list[Variant]:
    """One variant per point of the Cartesian product of ``{dotted key: [values]}``, the first key
    varying slowest; named ``key=value,key=value``."""
    if not isinstance(grid, dict) or not grid:
        raise SweepError(
            f"'{where}' must map dotted keys to lists of values, e.g. optim.lr: [1.0e-3, 3.0e-4]"
        )
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
    out = []
    for point in itertools.product(*grid.values()):
        overrides = tuple(f"{k}={format_value(v)}" for k, v in zip(grid, point))
        out.append(Variant(",".join(overrides), _override_list(list(overrides), where)))
    return out


def _bounds(spec: Any, where: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in spec)
    except (TypeError, ValueError):
        raise SweepError(f"{where} needs [low, high] numbers, got {spec!r}") from None
    if not lo <= hi:
        raise SweepError(f"{where}: low {lo} is above high {hi}")
    return lo, hi


def _draw(rng: np.random.Generator, dist: dict[str, Any], where: str) -> Any:
    """One value of a random-search dimension ``{kind: args}``; floats keep 4 significant digits."""
    if not isinstance(dist, dict) or len(dist) != 1:
        raise SweepError(f"{where} must be one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
    (kind, spec), where = next(iter(dist.items())), f"{where}.{next(iter(dist))}"
    if kind == "choice":
        if not isinstance(spec, list) or not spec:
            raise SweepError(f"{where} needs a non-empty list of values")
        return spec[int(rng.integers(len(spec)))]
    if kind not in DISTRIBUTIONS:
        raise SweepError(f"{where}: unknown distribution '{kind}';{suggest(kind, list(DISTRIBUTIONS))}")
    lo, hi = _bounds(spec, where)
    if kind == "int":
        if lo != int(lo) or hi != int(hi):
            raise SweepError(f"{where} needs integer bounds, got {spec!r}")
        return int(rng.integers(int(lo), int(hi) + 1))
    if kind == "loguniform":
        if lo <= 0:
            raise SweepError(f"{where} needs a positive low bound, got {lo}")
        x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    else:
        x = rng.uniform(lo, hi)
    return min(hi, max(lo, float(f"{x:.4g}")))  # rounding never leaves [lo, hi]


def random_variants(random: Any, where: str = "random") -> list[Variant]:
    """``n`` variants named random00, random01, ..., each dimension drawn in the order given from
    ``numpy.random.default_rng(seed)``: the same file gives the same variants."""
    if not isinstance(random, dict):
        raise SweepError(f"'{where}' must be a mapping with n, space and (optional) seed")
    unknown = [k for k in random if k not in ("n", "seed", "space")]
    if unknown:
        raise SweepError(f"{where}: unknown key '{unknown[0]}';{suggest(unknown[0], ['n', 'seed', 'space'])}")
    n, space = random.get("n"), random.get("space")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SweepError(f"{where}.n must be a positive integer, got {n!r}")
    if not isinstance(space, dict) or not space:
        raise SweepError(
            f"{where}.space must map dotted keys to distributions, e.g. optim.lr: {{loguniform: [1.0e-4, 1.0e-2]}}"
        )
    rng = np.random.default_rng(int(random.get("seed", 0)))
    width = max(2, len(str(n - 1)))
    out = []
    for i in range(n):
        overrides = [f"{k}={format_value(_draw(rng, d, f'{where}.space.{k}'))}" for k, d in space.items()]
        out.append(Variant(f"random{i:0{width}d}", _override_list(overrides, where)))
    return out


def named_variants(variants: Any) -> list[Variant]:
    if not isinstance(variants, dict) or not variants:
        raise SweepError(
            "'variants' must map names to lists of overrides, e.g. views4: [train.cache_views=4]"
        )
    return [Variant(str(name), _override_list(ov, f"variants.{name}")) for name, ov in variants.items()]


def _variants(data: dict[str, Any]) -> tuple[list[Variant], str]:
    """(all variants, baseline first, the baseline's name)."""
    found: list[Variant] = []
    if data.get("variants") is not None:
        found += named_variants(data["variants"])
    if data.get("grid") is not None:
        found += grid_variants(data["grid"])
    if data.get("random") is not None:
        found += random_variants(data["random"])
    base = data.get("baseline")
    if isinstance(base, str):
        names = [v.name for v in found]
        if base not in names:
            raise SweepError(
                f"baseline '{base}' is none of the variants;{suggest(base, names)} variants: {names}"
            )
        found.sort(key=lambda v: v.name != base)  # stable: the baseline first, the rest in order
        return found, base
    if base is not None and not isinstance(base, dict):
        raise SweepError(
            f"'baseline' must be a variant's name or {{name: ..., overrides: [...]}}, got {base!r}"
        )
    base = base or {}
    unknown = [k for k in base if k not in ("name", "overrides")]
    if unknown:
        raise SweepError(f"baseline: unknown key '{unknown[0]}' (keys: name, overrides)")
    name = str(base.get("name", "baseline"))
    return [Variant(name, _override_list(base.get("overrides"), "baseline.overrides")), *found], name


# ----------------------------------------------------------------------------- the file


def _path(raw: Any, key: str, folder: Path) -> Path:
    if not isinstance(raw, str) or not raw:
        raise SweepError(f"the sweep file needs '{key}:' (a path), got {raw!r}")
    p = Path(raw).expanduser()
    return p if p.is_absolute() or p.exists() or not (folder / p).exists() else folder / p


def safe_name(name: str) -> str:
    """A folder name for a variant: characters other than letters, digits and ``._=+-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name).strip("._") or "variant"


def _check_names(variants: list[Variant]) -> None:
    names = [v.name for v in variants]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise SweepError(f"variant name '{dup}' is used twice; names must be unique")
    ids = [safe_name(n)[:80] for n in names]
    clash = next((i for i in ids if ids.count(i) > 1), None)
    if clash:
        pair = [n for n, i in zip(names, ids) if i == clash]
        raise SweepError(f"variants {pair} share the folder name '{clash}'; name them under 'variants:'")


def _seeds(raw: Any) -> tuple[int, ...]:
    seeds = [raw] if isinstance(raw, int) else raw
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"'seeds' must be a non-empty list of integers, e.g. [0, 1, 2], got {raw!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"'seeds' lists a seed twice: {seeds}")
    return tuple(seeds)


def parse_sweep(
    data: Any,
    source: Path,
    cli_overrides: list[str] | None = None,
    output: str | None = None,
    seeds: list[int] | None = None,
) -> Sweep:
    """Check a sweep file's mapping (see the module docstring) and expand its variants;
    ``output`` and ``seeds`` (the command line's) replace the file's."""
    if not isinstance(data, dict):
        raise SweepError(f"{source} must hold a mapping (recipe, suite, seeds, variants / grid / random)")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise SweepError(
            f"{source}: unknown key '{unknown[0]}';{suggest(str(unknown[0]), list(KEYS))} keys: {', '.join(KEYS)}"
        )
    folder = source.parent
    variants, baseline = _variants(data)
    _check_names(variants)
    metrics = data.get("metrics") or []
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise SweepError(f"'metrics' must be a list like [animal_mnist/acc1, wall_s], got {metrics!r}")
    checkpoints = str(data.get("checkpoints", "final"))
    if checkpoints not in CHECKPOINTS:
        raise SweepError(f"'checkpoints' must be one of {', '.join(CHECKPOINTS)}, got {checkpoints!r}")
    name = str(data.get("name") or source.stem)
    return Sweep(
        name=name,
        source=source,
        recipe=_path(data.get("recipe"), "recipe", folder),
        suite=_path(data.get("suite"), "suite", folder),
        output=Path(output or data.get("output") or Path("runs") / "sweeps" / safe_name(name)),
        seeds=_seeds(seeds if seeds is not None else data.get("seeds", [0])),
        overrides=_override_list(data.get("overrides"), "overrides"),
        cli_overrides=_override_list(list(cli_overrides or []), "command-line overrides"),
        variants=tuple(variants),
        baseline=baseline,
        metrics=tuple(metrics),
        checkpoints=checkpoints,
    )


def load_sweep(
    path: str | Path,
    cli_overrides: list[str] | None = None,
    output: str | None = None,
    seeds: list[int] | None = None,
) -> Sweep:
    """Read a sweep file; ``cli_overrides`` apply to every run, after the variant's."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {err}") from None
    return parse_sweep(data, path, cli_overrides, output, seeds)


# ----------------------------------------------------------------------------- runs


def config_hash(cfg: Config) -> str:
    """Hash of a run's resolved config without what may change between sessions of one sweep
    (thread count, resume, output folder)."""
    fixed = replace(cfg, **{"train.threads": 0, "train.resume": "", "train.output_dir": ""})
    return hashlib.sha256(json.dumps(to_dict(fixed), sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_runs(sweep: Sweep, threads: int | None = None) -> list[Run]:
    """Every (variant, seed), variant-major, each config loaded now: a typo in any variant stops
    the sweep before the first run starts (``check_runs`` checks more, at the cost of imports)."""
    runs = []
    for variant in sweep.variants:
        for seed in sweep.seeds:
            run_id = f"{safe_name(variant.name)[:80]}__s{seed}"
            owned = [
                f"train.seed={seed}",
                f"train.output_dir={sweep.runs_dir}",
                f"train.run_name={run_id}",
                "train.resume=latest",
            ] + ([f"train.threads={threads}"] if threads else [])
            overrides = (*sweep.overrides, *variant.overrides, *sweep.cli_overrides, *owned)
            try:
                cfg = load_config(sweep.recipe, list(overrides))
            except ConfigError as err:
                raise SweepError(f"variant '{variant.name}' (seed {seed}): {err}") from None
            runs.append(Run(variant.name, seed, run_id, overrides, config_hash(cfg)))
    return runs


def check_runs(sweep: Sweep, runs: list[Run]) -> None:
    """The training loop's own config checks for every run, and the suite's datasets opened."""
    from clipkit.evaluation.runner import prepare
    from clipkit.evaluation.suite import load_suite
    from clipkit.training.loop import check_train_config

    for run in runs:
        try:
            check_train_config(load_config(sweep.recipe, list(run.overrides)))
        except ClipkitError as err:
            raise SweepError(f"variant '{run.variant}' (seed {run.seed}): {err}") from None
    for entry in load_suite(sweep.suite).entries:
        prepare(entry)


def default_metrics(sweep: Sweep) -> tuple[str, ...]:
    """The summary's columns: ``metrics:`` as given, else each suite dataset's headline metric
    (zero-shot acc1, retrieval text->image R@5 (or its first k), linear probe lp_acc1) and wall_s."""
    from clipkit.evaluation.suite import load_suite

    suite = load_suite(sweep.suite)
    names = [e.name for e in suite.entries]
    for m in sweep.metrics:
        dataset = m.split("/", 1)[0]
        if m not in TIME_METRICS and ("/" not in m or dataset not in names):
            raise SweepError(
                f"metric '{m}' is not <dataset>/<metric> of a dataset in {sweep.suite};"
                f"{suggest(dataset, names)} datasets: {names}, or one of {', '.join(TIME_METRICS)}"
            )
    if sweep.metrics:
        return sweep.metrics
    out = []
    for e in suite.entries:
        if e.task == "zeroshot_classification":
            out.append(f"{e.name}/acc1")
        elif e.task == "zeroshot_retrieval":
            k = 5 if 5 in e.recall_k else e.recall_k[0]
            out.append(f"{e.name}/image_retrieval_recall@{k}")
        else:
            out.append(f"{e.name}/lp_acc1")
    return (*out, "wall_s")
