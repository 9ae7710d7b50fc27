"""The typed run-config schema: every key refuses a wrong type and an out-of-range value in one line naming it,
unknown keys are refused at every depth (YAML, overrides, engine.audit), the eps forms load and plan, run names are
plain names, docs/runs.md's key table matches the schema, and a hypothesis fuzz of bad configs through the CLI."""

from __future__ import annotations

import dataclasses
import math
import re
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.attacks import ATTACKS
from engine.cli import main
from engine.detectors import DETECTORS
from engine.runs import DEFAULTS, ConfigError, load_config
from engine.runs.config import Budget, DatasetSpec, Device, PlainName, RunConfig
from engine.runs.plan import ADAPTIVE, build_cells, headline

DOCS = Path(__file__).resolve().parent.parent / "docs" / "runs.md"
UNKNOWN_AT_EVERY_DEPTH = [
    "bogus", "ray.bogus", "split.bogus", "model.bogus", "model.input.bogus", "model.options.bogus", "attack.bogus",
    "attack.pgd.bogus", "hfc.bogus", "hfc.calibration.bogus", "hfc.fit.bogus", "hfc.options.pgd.bogus",
    "hfc.options.bogus", "detector.bogus", "detector.dnn.bogus", "detector.arms.same.bogus", "headline.bogus",
    "projection.bogus", "resources.bogus", "resources.model.bogus", "study.bogus", "study.stress.bogus",
    "datasets.0.bogus", "models.0.bogus",
]  # fmt: skip


def nested(dotted: str, value: object) -> dict:
    """``{"a": {"b": value}}`` for ``a.b``; a numeric part is an index into a one-item list (``datasets.0.n``)."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return {head: value}
    index, _, tail = rest.partition(".")
    if index.isdigit():
        base = dict(DEFAULTS[head][0]) if DEFAULTS[head] else {}
        return {head: [{**base, **nested(tail, value)} if tail else value]}
    return {head: nested(rest, value)}


def leaves(schema: type = RunConfig, prefix: str = "") -> list[tuple[str, object, dict]]:
    """(dotted key, type, rules) of every key of the schema, nested sections walked."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        dotted = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaves(hints[f.name], dotted + ".")
        else:
            out.append((dotted, hints[f.name], dict(f.metadata)))
    return out


def accepts_mapping(hint: object) -> bool:
    kinds = [hint, *typing.get_args(hint)]
    return any(typing.get_origin(k) in (dict,) or k in (dict, DatasetSpec) or hasattr(k, "conform") and k not in (
        Budget, PlainName, Device) for k in kinds)  # fmt: skip


def wrong_type(hint: object) -> object:
    """A value of a type the key does not take: a list where a mapping is meant, else a mapping."""
    return [1, 2] if accepts_mapping(hint) else {"wrong": "type"}


def out_of_range(hint: object, rules: dict) -> object | None:
    """A value of the right type outside the key's range, or None when the key has no range."""
    kinds = [hint, *typing.get_args(hint)]
    kinds += [inner for kind in kinds for inner in typing.get_args(kind)]
    wrap = (lambda v: [v]) if typing.get_origin(hint) is list else (lambda v: v)
    if Budget in kinds:
        return wrap("16")
    if PlainName in kinds:
        return "../escape"
    if Device in kinds:
        return "tpu"
    if "choices" in rules:
        return wrap("no-such-name")
    for name, shift in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if name in rules:
            return wrap(rules[name] + shift)
    return None


def takes_floats(hint: object) -> bool:
    kinds = [hint, *typing.get_args(hint)]
    return float in kinds + [inner for kind in kinds for inner in typing.get_args(kind)]


KEYS = leaves()


def test_the_schema_walk_covers_every_default_key():
    flat = {dotted for dotted, _, _ in KEYS}
    assert flat >= {"seed", "hfc.n_components", "hfc.reg_covar", "model.lr", "model.width", "model.dropout",
                    "detector.bootstrap", "split.val", "attack.steps", "ray.retries", "threads", "device"}  # fmt: skip
    for section in ("attack", "detector"):  # the per-method option mappings sit beside the section's keys
        assert set(DEFAULTS[section]) - {d.split(".")[1] for d in flat if d.startswith(section + ".")} == set(
            ATTACKS if section == "attack" else DETECTORS)  # fmt: skip


@pytest.mark.parametrize(("dotted", "hint", "rules"), KEYS, ids=[k for k, _, _ in KEYS])
def test_every_key_refuses_a_wrong_type_and_an_out_of_range_value(dotted, hint, rules):
    bad = [wrong_type(hint)]
    limit = out_of_range(hint, rules)
    if limit is not None:
        bad.append(limit)
    if takes_floats(hint):
        bad += [math.nan, math.inf]
    for value in bad:
        with pytest.raises(ConfigError) as info:
            load_config(settings=[nested(dotted, value)])
        message = str(info.value)
        assert "\n" not in message and dotted in message, (value, message)


@pytest.mark.parametrize("dotted", [f"{s}.{m}" for s, r in (("attack", ATTACKS), ("detector", DETECTORS)) for m in r])
def test_method_options_refuse_a_wrong_type_and_unknown_names(dotted):
    for value, expected in (([1], dotted), ({"bogus": 1}, f"{dotted}.bogus")):
        with pytest.raises(ConfigError, match=re.escape(f"'{expected}'")):
            load_config(settings=[nested(dotted, value)])


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("attack.pgd.steps", "abc", "'attack.pgd.steps' must be an integer"),
        ("attack.pgd.steps", -2, "'attack.pgd' has options the PGD class refuses: steps must be an int >= 1"),
        ("detector.kd.bandwidth", -1.0, "'detector.kd' has options the KD class refuses: bandwidth must be > 0"),
        ("hfc.options.cw_linf.kappa", "high", "'hfc.options.cw_linf.kappa' must be a finite number"),
        ("datasets.0.n", 0, "'datasets.0.n' must be an integer >= 1, got 0"),
        ("datasets.0.task", "retina", "'datasets.0.task' must be one of ['grade', 'binary']"),
        ("datasets.0.contrast", math.inf, "'datasets.0.contrast' must be a finite number > 0"),
        ("models.0.lr", "fast", "'models.0.lr' must be a finite number > 0"),
        ("models.0.options.small_stem", 3, "'models.0.options.small_stem' must be true or false"),
        ("model.input.range", [0, math.nan], "'model.input' must be a mapping of layout, range"),
        ("detector.arms.same.raw_layers", -1, "'detector.arms.same.raw_layers' must be an integer >= 0"),
        ("resources.model.cpus", 0, "'resources.model.cpus' must be a finite number > 0, got 0"),
        ("study.uap.bogus", 1, "unknown config key 'study.uap.bogus'"),
        ("seeds", 3, "'seeds' must be a non-empty list"),
        ("seeds", [1, 1], "'seeds' must be a non-empty list"),
        ("hfc.n_components", 0, "'hfc.n_components' must be an integer >= 1, got 0"),
    ],
)
def test_nested_values_are_checked(dotted, value, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(settings=[nested(dotted, value)])


def test_rules_between_keys():
    with pytest.raises(ConfigError, match=re.escape("'split.val' + 'split.test' must be < 1")):
        load_config(overrides=["split.val=0.5", "split.test=0.5"])
    with pytest.raises(ConfigError, match=re.escape("'headline.attack' must be one of the attacks")):
        load_config(overrides=["attacks=[pgd]", "headline.attack=cw_linf"])
    with pytest.raises(ConfigError, match=re.escape("'datasets.0.labels' is 'model', which needs model.checkpoint")):
        load_config(overrides=["datasets=[{name: image_folder, path: /data, labels: model}]"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=re.escape("config key 'device' is 'cuda', which this machine does not")):
            load_config(overrides=["device=cuda"])


@pytest.mark.parametrize("dotted", UNKNOWN_AT_EVERY_DEPTH)
def test_unknown_keys_are_refused_at_every_depth(dotted, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(nested(dotted, {"x": 1} if dotted == "hfc.options.bogus" else 1)))
    expected = re.escape(f"unknown config key '{dotted}'")
    with pytest.raises(ConfigError, match=expected):
        load_config(path)
    if not dotted.startswith(("datasets.0", "models.0")):  # an override indexes an existing list entry only
        with pytest.raises(ConfigError, match=expected):
            load_config(overrides=[f"{dotted}=1"])


def test_overrides_index_lists_and_merge_mappings():
    config = load_config(overrides=["datasets.0.n=50", "hfc={enabled: false}", "models=[{arch: resnet50}]"])
    assert config["datasets"][0]["n"] == 50 and config["hfc"]["enabled"] is False
    assert config["hfc"]["layers"] == DEFAULTS["hfc"]["layers"]  # a mapping override merges, keeping the rest
    with pytest.raises(ConfigError, match=re.escape("'models.1': '1' is not an index of the list")):
        load_config(overrides=["models=[{arch: resnet50}]", "models.1.arch=vgg16"])


def test_defaults_keep_their_shape_and_a_loaded_config_is_a_plain_dict():
    config = load_config()
    assert config == DEFAULTS and type(config) is dict
    assert load_config(settings=[{"eps": 0.03, "attacks": "pgd"}])["attacks"] == ["pgd"]  # scalars for lists


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("eps: 8/256", ["8/256"]),
        ("eps: [0.03]", ["0.03"]),
        ("eps: 0.03", ["0.03"]),
        ("eps: [2/255, 0.01]", ["2/255", "0.01"]),
        ("eps: ['1/256', 0.02]\nheadline: {eps: 0.02}", ["1/256", "0.02"]),
        ("eps: [1]", ["1"]),
        ("eps: [0.03]\nheadline: {eps: '0.03'}\ndetector: {noise_eps: 0.01}\nhfc: {step_size: 0.001}", ["0.03"]),
    ],
)
def test_every_documented_eps_form_loads_and_plans(source, expected, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(source + "\n")
    config = load_config(path, overrides=["studies=[]"])
    assert config["eps"] == expected
    cells = build_cells(config)  # HFC on, adaptive set at the headline: the settings are keyed by eps strings
    attack, eps = headline(config)
    assert eps in config["eps"] and any(c.stage == "features" and c.inputs["eps"] == eps for c in cells)
    assert any(c.stage == "attack" and c.inputs["eps"] == eps and c.inputs["variant"] == ADAPTIVE for c in cells)
    assert attack == "pgd" and all(c.inputs["eps"] in expected for c in cells if c.stage == "attack")


@pytest.mark.parametrize("override", ["eps=0.03", "eps=[0.03]", "eps=[2/255, 0.01]", "eps=8/256", "headline.eps=0.03"])
def test_eps_overrides_plan(override):
    extra = ["eps=[0.01, 0.03]"] if override.startswith("headline") else []
    build_cells(load_config(overrides=[*extra, override, "studies=[]"]))


@pytest.mark.parametrize("key", ["eps", "detector.noise_eps", "hfc.step_size", "headline.eps"])
@pytest.mark.parametrize("value", ["4", "16", 4, 2.5, "abc", "nan", math.inf, -0.1, True, [["8/256"]]])
def test_budgets_above_one_or_malformed_are_refused(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}") + ".*budget"):
        load_config(settings=[nested(key, value)])


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "/abs", "a\\b", "", None, "c:\\x"])
def test_run_names_are_plain_names(name):
    with pytest.raises(ConfigError, match=re.escape("config key 'name' must be a plain name")):
        load_config(settings=[{"name": name}])


def test_output_dir_is_a_path():
    assert load_config(overrides=["output_dir=../elsewhere/runs", "name=audit-1"])["name"] == "audit-1"


def test_validation_of_the_default_config_is_fast():
    start = time.perf_counter()
    for _ in range(10):
        load_config()
    assert (time.perf_counter() - start) / 10 < 0.5


# -- docs/runs.md's key table ------------------------------------------------------------------------------------


def doc_table() -> dict[str, str]:
    """``key -> default cell`` of the table under '## Config keys' in docs/runs.md."""
    section = DOCS.read_text().split("## Config keys", 1)[1]
    rows = re.findall(r"^\| `([^`]+)` \| (.*?) \| .* \|$", section, flags=re.M)
    return dict(rows)


def documented_keys() -> dict[str, object]:
    """Every key the table must have, with its default: the schema's keys, each method's option mapping as
    ``<attack>``/``<detector>``, and the per-method defaults (``attack.cw_linf.kappa``...)."""
    out: dict[str, object] = {}
    for dotted, _, _ in KEYS:
        head, _, rest = dotted.partition(".")
        value = DEFAULTS[head] if not rest else DEFAULTS[head][rest.split(".")[0]]
        for part in rest.split(".")[1:]:
            value = value[part]
        if isinstance(value, dict) and value and not any(isinstance(v, dict) for v in value.values()):
            out.update({f"{dotted}.{k}": v for k, v in value.items()})  # model.input: a row per field
        else:
            out[dotted] = value
    for section, generic in (("attack", "<attack>"), ("detector", "<detector>")):
        out[f"{section}.{generic}"] = {}
        methods = ATTACKS if section == "attack" else DETECTORS
        for method in methods:
            for option, value in DEFAULTS[section][method].items():
                out[f"{section}.{method}.{option}"] = value
    out["study.<study>"] = out.pop("study")
    return out


def default_matches(cell: str, value: object) -> bool:
    """The table's default cell shows ``value``: 'none' for null, else the first `code` span read as YAML (a
    mapping or list of mappings is described in words)."""
    if value is None:
        return cell.startswith("none")
    if isinstance(value, list) and value and isinstance(value[0], dict) or isinstance(value, dict) and value and (
        all(isinstance(v, dict) for v in value.values())):  # fmt: skip
        return True
    code = re.match(r"`([^`]*)`", cell)
    if code is None:
        return False
    shown = yaml.safe_load(code.group(1))

    def number(v: object) -> object:
        try:
            return float(v) if isinstance(v, str) else v
        except ValueError:
            return v

    if isinstance(value, list):
        return isinstance(shown, list) and [number(v) for v in shown] == [number(v) for v in value]
    return number(shown) == value


def test_the_docs_key_table_matches_the_schema():
    table, expected = doc_table(), documented_keys()
    assert set(expected) - set(table) == set(), "schema keys missing from docs/runs.md"
    assert set(table) - set(expected) == set(), "docs/runs.md documents keys the schema does not have"
    wrong = {k: (table[k], expected[k]) for k in expected if not default_matches(table[k], expected[k])}
    assert not wrong, f"defaults in docs/runs.md differ from the schema: {wrong}"


# -- the fuzz suite: bad configs through the CLI -----------------------------------------------------------------

JUNK = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 10**20, 1e300, "", "abc", "16", "../x", True, None]),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    st.lists(st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.sampled_from(["x", "n", "layers"]), st.integers(-3, 3), max_size=2),
)
FUZZ_KEYS = [dotted for dotted, _, _ in KEYS if dotted != "output_dir"] + [
    "datasets.0.n", "datasets.0.image_size", "datasets.0.task", "datasets.0.seed", "models.0.arch", "models.0.lr",
    "attack.pgd.steps", "attack.cw_linf.kappa", "detector.dnn.width", "detector.lid.k", "hfc.options.pgd.steps",
    "detector.arms.same.layers", "resources.attack.cpus", "study.stress.seeds", "bogus", "hfc.bogus",
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.tuples(st.sampled_from(FUZZ_KEYS), JUNK), min_size=1, max_size=3))
def test_fuzzed_configs_fail_in_one_line_before_any_work(changes, tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("fuzz")
    config: dict = {"output_dir": str(root / "runs"), "studies": []}
    for dotted, value in changes:
        update = nested(dotted, value)
        head = next(iter(update))
        both = isinstance(config.get(head), dict) and isinstance(update[head], dict)
        config[head] = {**config[head], **update[head]} if both else update[head]
    try:
        loaded = load_config(settings=[config])
    except ConfigError:
        path = root / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        capsys.readouterr()
        assert main(["run", str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (root / "runs").exists()  # no run directory, no half-written state
        return
    assert set(loaded) == set(DEFAULTS)  # a valid generated config keeps the shape (and is not run)
