"""Read and check a `sae-kit run` config before any compute: every problem at once, each with its file, line, key
and fix.

Checked: unknown keys (with a "did you mean"), wrong types, fields the pipeline sets itself, each stage's own
config rules (the library configs' validation), hook points the model lacks (from the model's config alone, see
`hooks`), impossible sizes (k ≥ d_sae, a batch larger than the tokens, more latents than the SAE has) and an LLM
explainer or scorer whose endpoint cannot be reached.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from activation_store.model import BACKENDS, REFERENCE_NAME
from activation_store.store import CacheConfig
from activation_store.tokens import DatasetConfig
from autointerp.llm.check import endpoint_problem
from sae_kit.pipeline.config import (
    DEFAULT_CONFIG,
    EXAMPLES,
    OWNED,
    STAGES,
    InterpSection,
    RunConfig,
    SiteSection,
    SteerSection,
)
from sae_kit.sae.base import SparseCoder
from sae_kit.train.config import SWEEPABLE, SweepConfig, TrainConfig

TOP_LEVEL: dict[str, tuple[Any, str]] = {
    "out": (str, "output folder of the run (default: runs/<config file name>)"),
    "model": (str, "hub name, local folder or 'reference'"),
    "backend": (str, f"hook-name backend: one of {list(BACKENDS)}"),
    "device": (str | None, "cpu, cuda, cuda:1 ... (default: CUDA when present)"),
    "seed": (int, "seed of every stage"),
}


@dataclass(frozen=True)
class Issue:
    """One problem in a config."""

    key: str
    """Where: a dotted path such as `train[0].k`."""
    message: str
    """What is wrong, naming the bad value."""
    fix: str
    """What to write instead."""
    line: int | None = None
    """Line of the key in the file, when known."""


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, source: str, issues: list[Issue]):
        self.source, self.issues = source, issues
        lines = [f"{len(issues)} problem{'s' if len(issues) > 1 else ''} in {source}:"]
        for i in issues:
            where = f"{source}:{i.line}" if i.line else source
            lines.append(f"  {where}: {i.key}: {i.message}\n      fix: {i.fix}")
        super().__init__("\n".join(lines))


# -- reading ----------------------------------------------------------------------------------------------------
def _key_lines(node: Any, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Dotted key path → 1-based line, from a composed YAML node tree."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = f"{prefix}.{k.value}" if prefix else str(k.value)
            out[path] = k.start_mark.line + 1
            _key_lines(v, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = v.start_mark.line + 1
            _key_lines(v, path, out)
    return out


def resolve_config_path(name: str | None) -> Path:
    """The file a config argument names: a path, or one of the shipped configs by name (None: the default)."""
    if name is None:
        return DEFAULT_CONFIG
    if name in EXAMPLES and not Path(name).exists():
        return EXAMPLES[name]
    path = Path(name)
    if not path.exists():
        close = difflib.get_close_matches(name, list(EXAMPLES), n=1)
        hint = f"; did you mean the shipped config {close[0]!r}?" if close else ""
        raise FileNotFoundError(f"config file {name!r} does not exist (shipped configs: {list(EXAMPLES)}){hint}")
    return path


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The file's mapping and the line of every key; ConfigError for a file that is not a YAML mapping."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(str(path), [Issue("(file)", f"not valid YAML: {getattr(err, 'problem', err)}",
                                            "fix the syntax at that line", mark.line + 1 if mark else None)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [Issue("(file)", f"holds a {type(data).__name__}, not a mapping of sections",
                                            "start from the default config (`sae-kit run --print-config`)")])
    return data, _key_lines(node)


# -- type checks ------------------------------------------------------------------------------------------------
def _describe(hint: Any) -> str:
    """A type hint in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" (or null)" if type(None) in args else "")
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a type hint (ints fit floats; a single value fits a list)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is not None and origin not in (tuple, list, dict) and args:  # a Union
        return any(_matches(value, a) for a in args)
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [value]
        return all(_matches(v, args[0]) for v in items) if args else True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return True


def _example(name: str, default: Any) -> str:
    if default is dataclasses.MISSING or default is None:
        return f"see `sae-kit run --print-config` for {name}"
    if dataclasses.is_dataclass(default):
        return f"give {name} as a mapping of its fields"
    value = list(default) if isinstance(default, tuple) else default
    return f"e.g. {yaml.safe_dump({name: value}, default_flow_style=True).strip().strip('{}')}"


class Checker:
    """Collects the issues of one config file."""

    def __init__(self, source: str, lines: dict[str, int]):
        self.source, self.lines = source, lines
        self.issues: list[Issue] = []
        self.hook_keys: dict[str, list[str]] = {}
        """Every hook point named in the file → the keys naming it (also those of entries that failed to build,
        so their hook points are checked too)."""
        self.train_keys: list[str] = []
        """The key of each training pass that built, in RunConfig.train order."""

    def name_hooks(self, key: str, value: Any) -> None:
        """Record the hook point(s) a key names."""
        names = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
        for h in names:
            if isinstance(h, str):
                for part in (p.strip() for p in h.split(",")):
                    if part:
                        self.hook_keys.setdefault(part, []).append(key)

    def add(self, key: str, message: str, fix: str) -> None:
        """Record one problem at a dotted key (a key the file lacks takes the line of its nearest parent)."""
        probe = key
        while probe not in self.lines and ("." in probe or "[" in probe):
            probe = probe[:max(probe.rfind("."), probe.rfind("["))]
        self.issues.append(Issue(key, message, fix, self.lines.get(probe)))

    def mapping(
        self, data: Any, path: str, fields: dict[str, tuple[Any, Any]], owned: dict[str, str] | None = None,
        coerce: dict[str, Callable[[Any], Any]] | None = None,
    ) -> dict[str, Any]:
        """Check a mapping against {field: (type hint, default)}; return the good fields (converted by `coerce`)."""
        if data is None:
            return {}
        if not isinstance(data, dict):
            self.add(path, f"must be a mapping of fields, got {type(data).__name__} {data!r}",
                     f"write it as `{path.rsplit('.', 1)[-1]}:` followed by indented `field: value` lines")
            return {}
        owned, coerce = owned or {}, coerce or {}
        good: dict[str, Any] = {}
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if key in owned:
                self.add(where, f"is set by the pipeline, not in this section: it comes from {owned[key]}",
                         f"delete `{key}` here (set {owned[key]} instead)")
                continue
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
                self.add(where, "unknown key" + (f"; did you mean {close[0]!r}?" if close else ""),
                         f"rename it to {close[0]!r}" if close else
                         f"remove it; valid keys here: {', '.join(sorted(fields))}")
                continue
            hint, default = fields[key]
            if key in coerce:
                try:
                    value = coerce[key](value)
                except (TypeError, ValueError) as err:
                    self.add(where, f"{err}", _example(key, default))
                    continue
            if not _matches(value, hint):
                self.add(where, f"expected {_describe(hint)}, got {type(value).__name__} {value!r}",
                         _example(key, default))
                continue
            good[key] = value
        return good

    def build(self, path: str, make: Callable[[], Any]) -> Any:
        """Construct a library config; its own validation error becomes an issue at `path`."""
        try:
            return make()
        except (ValueError, TypeError) as err:
            self.add(path, str(err), "change the value the message names")
            return None


def fields_of(cls: type, skip: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """{field: (resolved type hint, default)} of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        out[f.name] = (hints[f.name], default)
    return out


def _sweepable(hint: Any) -> Any:
    """A sweepable field takes one value or a list of them."""
    return hint | list[hint] if hint is not Any else hint


# -- sections ---------------------------------------------------------------------------------------------------
def _cache(c: Checker, data: Any, top: dict[str, Any]) -> CacheConfig | None:
    fields = fields_of(CacheConfig, skip=OWNED["cache"])
    values = c.mapping(data, "cache", fields, OWNED["cache"])
    dataset = values.pop("dataset", None)
    if isinstance(dataset, str):
        dataset = {"path": dataset}
    ds_values = c.mapping(dataset, "cache.dataset", fields_of(DatasetConfig))
    ds = c.build("cache.dataset", lambda: DatasetConfig(**ds_values))
    if "hook_points" in values:
        values["hook_points"] = tuple([values["hook_points"]] if isinstance(values["hook_points"], str)
                                      else values["hook_points"])
    values.setdefault("hook_points", ())
    return c.build("cache", lambda: _cache_config(values, ds, top)) if ds is not None else None


def _cache_config(values: dict[str, Any], ds: DatasetConfig, top: dict[str, Any]) -> CacheConfig:
    hooks = values.pop("hook_points") or ("<from train>",)  # filled in from the train entries afterwards
    return CacheConfig(model=top["model"], backend=top["backend"], device=top["device"], seed=top["seed"],
                       out=str(Path(top["out"]) / "cache" / "activations"), dataset=ds, hook_points=hooks, **values)


def _train(c: Checker, data: Any, top: dict[str, Any], cache: CacheConfig | None) -> list[TrainConfig]:
    entries = data if isinstance(data, list) else [data] if isinstance(data, dict) else None
    if not entries:
        c.add("train", f"must be a mapping (one training pass) or a list of them, got {data!r}",
              "e.g. train: [{name: topk, architecture: topk, hook_points: blocks.2.hook_resid_post, k: 32}]")
        return []
    fields = fields_of(TrainConfig, skip=OWNED["train"])
    for name in SWEEPABLE:
        fields[name] = (_sweepable(fields[name][0]), fields[name][1])
    fields["hook_point"] = fields["hook_points"]  # the singular aliases TrainConfig.from_dict accepts
    fields["target_hook_point"] = fields["target_hook_points"]
    sweep_fields = fields_of(SweepConfig)
    out: list[TrainConfig] = []
    for i, entry in enumerate(entries):
        path = f"train[{i}]" if isinstance(data, list) else "train"
        values = c.mapping(entry, path, fields, OWNED["train"])
        if "sweep" in values:
            values["sweep"] = c.mapping(values["sweep"], f"{path}.sweep",
                                        {k: (_sweepable(h), d) for k, (h, d) in sweep_fields.items()})
        if not (values.get("hook_points") or values.get("hook_point")) and isinstance(entry, dict):
            c.add(f"{path}.hook_points", "missing: each training pass names the hook point(s) it reads",
                  "e.g. hook_points: blocks.2.hook_resid_post")
            continue
        for field_name in ("hook_points", "hook_point", "target_hook_points", "target_hook_point"):
            if field_name in values:
                c.name_hooks(f"{path}.{field_name}", values[field_name])
        values.setdefault("name", values.get("architecture", "topk"))
        ds = cache.dataset if cache is not None else DatasetConfig()
        cfg = c.build(path, lambda v=values, ds=ds: TrainConfig.from_dict({
            "seed": top["seed"], **v, "activations": str(Path(top["out"]) / "cache" / "activations"),
            "model": top["model"], "device": top["device"], "out": str(Path(top["out"]) / "train" / v["name"]),
            "dataset": ds.path, "dataset_name": ds.name, "text_column": ds.text_column,
            "context_size": ds.context_size}))
        if cfg is not None:
            out.append(cfg)
            c.train_keys.append(path)
    return out


def _eval(c: Checker, data: Any) -> dict[str, Any]:
    from evals.evaluate import EvalConfig
    from evals.suites import SuiteConfig

    values = c.mapping(data, "eval", fields_of(EvalConfig, skip=OWNED["eval"]), OWNED["eval"])
    if "suite" in values:  # nested settings: checked key by key, and built, as the stage needs a SuiteConfig
        values["suite"] = _dataclass(c, values["suite"], "eval.suite", SuiteConfig)
    c.build("eval", lambda: EvalConfig(sae_paths=("x",), out="x", **values))
    return values


def _decoder_suites(c: Checker, train: list[TrainConfig], eval_values: dict[str, Any]) -> None:
    """Report eval suites that set decoder directions against input-space probes when a pass trains transcoders."""
    from evals.suites import parse_suites
    from evals.tasks import DECODER_SUITES

    try:
        bad = [s for s in parse_suites(eval_values.get("suites", ("core",))) if s in DECODER_SUITES]
    except ValueError:  # reported by _eval
        return
    for key, t in zip(c.train_keys, train):
        if bad and t.transcoder:
            c.add("eval.suites", f"{bad} compare decoder directions with probes of the input, but {key} trains "
                  f"transcoders, whose decoders write {list(t.target_hook_points)}",
                  f"drop {bad} from eval.suites (core, probing and consistency run on transcoders)")


def _dataclass(c: Checker, data: Any, path: str, cls: type) -> Any:
    """A config dataclass from a mapping, nested dataclass fields (optional ones too) built the same way; every
    unknown key or wrong type is reported at its full path. The class's defaults where it cannot be built."""
    fields = fields_of(cls)
    values = c.mapping(data, path, fields)
    for name, value in list(values.items()):
        hint = fields[name][0]
        inner = next((h for h in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(h)), None)
        if inner is not None and isinstance(value, dict):
            values[name] = _dataclass(c, value, f"{path}.{name}", inner)
    return c.build(path, lambda: cls(**values)) or cls()


def _latents(value: Any) -> Any:
    """interp.latents: an integer N means N random live latents."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"latents must be positive, got {value}")
        return f"random:{value}"
    return value


def _scorers(value: Any) -> Any:
    return tuple(s.strip() for s in value.split(",") if s.strip()) if isinstance(value, str) else value


def _interp(c: Checker, data: Any, top: dict[str, Any]) -> tuple[dict[str, Any], InterpSection]:
    from autointerp.pipeline import InterpConfig
    from autointerp.records import RecordConfig

    fields = fields_of(InterpConfig, skip={*OWNED["interp"], "control"})
    extra = fields_of(InterpSection)
    values = c.mapping(data, "interp", {**fields, **extra}, OWNED["interp"],
                       coerce={"latents": _latents, "scorers": _scorers})
    section = c.build("interp", lambda: InterpSection(**{k: values.pop(k) for k in list(values) if k in extra}))
    records = c.mapping(values.pop("records", None), "interp.records", fields_of(RecordConfig))
    rec = c.build("interp.records", lambda: RecordConfig(**{"seed": top["seed"], **records}))
    if rec is not None:
        c.build("interp", lambda: InterpConfig(sae_path="x", out="x", records=rec, **values))
    return {**values, "records": records}, section or InterpSection()


def _plain_section(c: Checker, data: Any, name: str, cls: type) -> Any:
    values = c.mapping(data, name, fields_of(cls))
    return c.build(name, lambda: cls(**values)) or cls()


# -- cross-stage checks -----------------------------------------------------------------------------------------
def _hook_points(c: Checker, cfg: RunConfig) -> dict[str, int | None] | None:
    """Check every hook point against the model's hook list; the real widths, None where the model was unreadable."""
    from sae_kit.pipeline.hooks import hook_widths, load_hf_config

    try:
        hf_config = load_hf_config(cfg.model)
    except Exception as err:  # OSError, ValueError, EnvironmentError from transformers: all mean "cannot read it"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        c.add("model", f"cannot read the config of model {cfg.model!r}: {str(err).splitlines()[0]}",
              "give a local folder, 'reference', or a hub name" + (" already in the local Hugging Face cache "
                                                                   "(HF_HUB_OFFLINE=1 is set)" if offline else ""))
        return None
    from activation_store.model import closest_names
    from sae_kit.pipeline.hooks import n_layers

    _context_sizes(c, cfg, hf_config)
    wanted = _hook_sources(c, cfg)
    layers = n_layers(hf_config)
    deepest = max((d for d in (_layer(h) for h in wanted) if d is not None), default=None)
    try:
        widths, backend = hook_widths(hf_config, cfg.model, cfg.backend,
                                      deepest_layer=None if deepest is None or layers is None or deepest >= layers
                                      else deepest)
    except Exception as err:
        c.add("model", f"cannot build model {cfg.model!r} from its config to list its hook points: {err}",
              "check the model name; `sae-kit hooks --model M` lists hook points of a model you have locally")
        return None
    valid = list(widths)
    for hook, keys in wanted.items():
        if hook in widths:
            continue
        layer = _layer(hook)
        if layer is not None and layers is not None and layer >= layers:
            message = f"{hook!r}: model {cfg.model!r} has {layers} blocks (0..{layers - 1})"
        else:
            message = f"{hook!r} is not a hook point of model {cfg.model!r} ({backend} names)"
        c.add(keys[0], message, f"use one of {closest_names(hook, valid)} (`sae-kit hooks --model {cfg.model}` "
                                f"lists them all)")
    order = {h: i for i, h in enumerate(widths)}  # the model lists its hook points in firing order
    for key, t in zip(c.train_keys, cfg.train):
        for hook, target in zip(t.hook_points, t.target_hook_points):
            if hook in order and target in order and order[target] < order[hook]:
                c.add(f"{key}.target_hook_points", f"{target!r} fires before the transcoder's input {hook!r}, so "
                      "no eval, interp or steer can splice it in", "pair each input with a later hook point (e.g. "
                      "blocks.L.mlp.hook_in → blocks.L.hook_mlp_out)")
    return widths


def _context_sizes(c: Checker, cfg: RunConfig, hf_config: Any) -> None:
    """Every stage's context against the model's position embeddings (caught here, not after cache and train)."""
    from activation_store.model import max_positions

    n_ctx = max_positions(hf_config)
    if n_ctx is None:
        return
    records = cfg.interp.get("records", {}) if isinstance(cfg.interp.get("records", {}), dict) else {}
    for key, size in (("cache.dataset.context_size", cfg.cache.dataset.context_size),
                      ("eval.context_size", cfg.eval.get("context_size")),  # None: the SAE's training context
                      ("interp.records.context_size", records.get("context_size", 64))):
        if isinstance(size, int) and size > n_ctx:
            c.add(key, f"{size} tokens per context, but model {cfg.model!r} reads at most {n_ctx}",
                  f"lower {key} to at most {n_ctx}")


def _layer(hook: str) -> int | None:
    """Block index in a hook point's name (TransformerLens `blocks.N.`, HF `h.N.` / `layers.N.`), if any."""
    m = re.search(r"(?:blocks|h|layers|layer)\.(\d+)\b", hook)
    return int(m.group(1)) if m else None


def _hook_sources(c: Checker, cfg: RunConfig) -> dict[str, list[str]]:
    """Every hook point the run reads → the config keys that name it (the training passes' first)."""
    out = {h: list(keys) for h, keys in c.hook_keys.items()}
    for h in cfg.cache.hook_points:
        out.setdefault(h, []).append("cache.hook_points")
    return out


def _sizes(c: Checker, cfg: RunConfig, widths: dict[str, int | None] | None) -> None:
    """k ≥ d_sae, batches larger than the tokens, more latents than an SAE has."""
    cache = cfg.cache
    ctx = cache.dataset.context_size
    if cache.n_tokens < ctx:
        c.add("cache.n_tokens", f"{cache.n_tokens} tokens is less than one context of {ctx}",
              f"raise cache.n_tokens to at least {ctx} (or lower cache.dataset.context_size)")
    rows = cache.n_tokens  # an upper bound: special-token rows are dropped
    d_saes: list[int] = []
    for key, t in zip(c.train_keys, cfg.train):
        if t.batch_size > rows:
            c.add(f"{key}.batch_size", f"{t.batch_size} rows per step, but the cache holds at most {rows} rows",
                  f"lower {key}.batch_size below {rows} or raise cache.n_tokens above {t.batch_size}")
        if t.n_tokens < t.batch_size:
            c.add(f"{key}.n_tokens", f"{t.n_tokens} training tokens is less than one batch of {t.batch_size}",
                  f"raise {key}.n_tokens to a multiple of {t.batch_size} or lower batch_size")
        for spec in t.specs(t.hook_points[0]):
            d_in = (widths or {}).get(spec.hook_point or "")
            d_sae = spec.d_sae or (spec.expansion * d_in if d_in else None)
            if d_sae is None:
                continue
            d_saes.append(d_sae)
            arch = SparseCoder.REGISTRY.get(t.architecture)  # the registry now: architectures registered late count
            if arch is not None and arch.has_k and spec.k >= d_sae:
                c.add(f"{key}.k", f"k = {spec.k} active latents needs more than d_sae = {d_sae} latents "
                      f"(SAE {spec.name})", f"lower k below {d_sae} or raise d_sae / expansion")
    latents = str(cfg.interp.get("latents", "0:64"))
    n_explained = None  # latents interp explains per SAE, when the spec and the SAE widths say
    if d_saes:
        from autointerp.spec import parse_latent_spec

        try:
            spec = parse_latent_spec(latents, min(d_saes))
            n_explained = spec.n_random or len(spec.indices)
        except ValueError as err:
            c.add("interp.latents", f"{err} (the smallest SAE has {min(d_saes)} latents)",
                  f"choose latents below {min(d_saes)}, e.g. random:{min(64, min(d_saes))}")
    records = cfg.interp.get("records", {})
    r_ctx = records.get("context_size", 64) if isinstance(records, dict) else 64
    r_tok = records.get("n_tokens", 100_000) if isinstance(records, dict) else 100_000
    if r_tok < r_ctx:
        c.add("interp.records.n_tokens", f"{r_tok} tokens is less than one context of {r_ctx}",
              f"raise interp.records.n_tokens to at least {r_ctx}")
    if n_explained is not None and cfg.steer.n_latents > n_explained:
        c.add("steer.n_latents", f"{cfg.steer.n_latents} latents to steer, but interp explains only "
              f"{n_explained} per SAE", "lower steer.n_latents or raise interp.latents")
    passes = [Path(t.out).name for t in cfg.train]
    for key, name in zip(c.train_keys, passes):
        if passes.count(name) > 1:  # one folder OUT/train/<name>/ each: the second would delete the first's SAEs
            c.add(f"{key}.name", f"two training passes share the name {name!r} (and the folder train/{name}/)",
                  "give each train entry its own `name:`")
            break
    names = cfg.sae_names()
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        c.add("train", f"two training passes make SAEs of the same name {dupes}",
              "give each train entry its own `name:`")


def _llm(c: Checker, cfg: RunConfig) -> None:
    from autointerp.pipeline import LLM_SCORERS

    spec = cfg.interp.get("llm")
    needs = cfg.interp.get("explainer") == "llm" or any(s in LLM_SCORERS for s in cfg.interp.get("scorers", ()))
    if spec and needs:
        problem = endpoint_problem(spec)
        if problem:
            c.add("interp.llm", f"the LLM {spec!r} is not reachable: {problem}",
                  "start the server or fix the spec / API key; or run offline with `explainer: baseline` and "
                  "`scorers: [embedding]`")


# -- the whole file ---------------------------------------------------------------------------------------------
def load_config(path: str | None = None, out: str | None = None, device: str | None = None,
                check_model: bool = True) -> RunConfig:
    """Read and check a config (None: the embedded default); ConfigError lists every problem found.

    `out` and `device` override the file's. With `check_model`, hook points and widths are checked against
    the model's config (one small random model is built; no weights are read).
    """
    file = resolve_config_path(path)
    source = "<default config>" if path is None else str(file)
    data, lines = read_yaml(file)
    c = Checker(source, lines)
    known = {**{k: (hint, None) for k, (hint, _) in TOP_LEVEL.items()}, **{s: (Any, None) for s in STAGES}}
    top = c.mapping(data, "", known)
    top = {"out": out or top.get("out") or str(Path("runs") / file.stem), "model": top.get("model", REFERENCE_NAME),
           "backend": top.get("backend", "auto"), "device": device or top.get("device"), "seed": top.get("seed", 0),
           **{s: top.get(s) for s in STAGES}}
    if top["backend"] not in BACKENDS:
        c.add("backend", f"unknown backend {top['backend']!r}", f"use one of {list(BACKENDS)}")
        top["backend"] = "auto"
    if top["train"] is None:
        c.add("train", "missing: the run needs at least one training pass",
              "e.g. train: [{name: topk, architecture: topk, hook_points: blocks.2.hook_resid_post, k: 32}]")
    cache = _cache(c, top["cache"], top)
    train = _train(c, top["train"], top, cache) if top["train"] is not None else []
    eval_values = _eval(c, top["eval"])
    _decoder_suites(c, train, eval_values)
    interp_values, interp_section = _interp(c, top["interp"], top)
    steer = _plain_section(c, top["steer"], "steer", SteerSection)
    site = _plain_section(c, top["site"], "site", SiteSection)
    if cache is None or not train:
        raise ConfigError(source, c.issues or [Issue("train", "no training pass could be read", "see above")])
    cache = _with_train_hooks(c, cache, train)
    cfg = RunConfig(source=source, out=top["out"], model=top["model"], backend=top["backend"], device=top["device"],
                    seed=top["seed"], cache=cache, train=tuple(train), eval=eval_values, interp=interp_values,
                    interp_control=interp_section, steer=steer, site=site)
    widths = _hook_points(c, cfg) if check_model else None
    _sizes(c, cfg, widths)
    _llm(c, cfg)
    if c.issues:
        raise ConfigError(source, c.issues)
    return cfg


def _with_train_hooks(c: Checker, cache: CacheConfig, train: list[TrainConfig]) -> CacheConfig:
    """The cache's hook points: as given (each train hook must be among them), or every hook the train stage reads."""
    needed = list(dict.fromkeys(h for t in train for h in (*t.hook_points, *t.target_hook_points)))
    if cache.hook_points == ("<from train>",):
        return dataclasses.replace(cache, hook_points=tuple(needed))
    for key, t in zip(c.train_keys, train):
        missing = [h for h in (*t.hook_points, *t.target_hook_points) if h not in cache.hook_points]
        if missing:
            c.add(f"{key}.hook_points", f"reads {missing}, which the cache stage does not capture",
                  f"add {missing} to cache.hook_points (or leave cache.hook_points out to capture what train reads)")
    return cache
