"""Defenses from outside the package (``run.plugins``, entry points): imported before the config is checked,
their own typed section, one clear error naming the file, and fingerprints that see their source."""

import os
import textwrap

import pytest

import run as cli
from booster_jax.config import load_config
from booster_jax.errors import BoosterInputError
from booster_jax.fingerprint import config_parts
from booster_jax.methods.base import get_method, method_config
from booster_jax.train.stages import method_parts
from tests.plugin_registry import isolated_registry  # noqa: F401  (fixture)

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic", "smoke.yaml")

PLUGIN = '''
import dataclasses
import booster_jax as bj

@dataclasses.dataclass(frozen=True)
class Section:
    scale: float = bj.setting(1.0, bj.POS)
    tags: list[str] = bj.setting(["a"])

def make_step(ctx):
    return bj.make_sft_step(ctx)

bj.register(bj.MethodSpec(name="{name}", stage="align", streams=("align",), make_step=make_step,
                          config_section="{section}", config_class=Section))
'''


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def plugin_config(tmp_path, body: str, extra: str = "") -> str:
    """A plugin file and a YAML naming it by a path relative to the YAML (as examples/ does)."""
    write(tmp_path / "defense.py", body)
    return str(write(tmp_path / "run.yaml", f"base: {os.path.abspath(SMOKE)}\nrun: {{plugins: [defense.py]}}\n{extra}"))


def test_a_plugin_method_runs_like_a_built_in_with_its_own_section(tmp_path, isolated_registry):
    path = plugin_config(tmp_path, PLUGIN.format(name="mine", section="mine"),
                         "align: {method: mine, mine: {scale: 2.5}}\n")
    cfg = load_config(path)
    assert cfg.run.plugins == [str(tmp_path / "defense.py")]  # found next to the YAML, not the working dir
    spec = get_method("mine", "align")
    assert spec.source == os.path.realpath(tmp_path / "defense.py")
    assert method_config(spec, cfg.align).scale == 2.5 and cfg.align.mine.tags == ["a"]
    # a grid variant of the same config (what the pipeline expands) keeps the section and the method
    from booster_jax.config import apply_overrides

    assert apply_overrides(cfg, {"align.mine.scale": 3}).align.mine.scale == 3.0


def test_section_values_are_checked_with_every_other_problem(tmp_path, isolated_registry):
    path = plugin_config(tmp_path, PLUGIN.format(name="mine", section="mine"),
                         "align: {method: mine, mine: {scale: 0, bogus: 1, tags: 3}}\nlora: {r: 0}\n")
    with pytest.raises(BoosterInputError) as e:
        load_config(path)
    msg = str(e.value)
    for line in ("4 problems", "align.mine.scale: expected a value > 0, got 0", "align.mine.bogus: unknown key",
                 "align.mine.tags: expected a list", "lora.r: expected a value > 0"):
        assert line in msg, msg


def test_an_unknown_method_lists_the_plugin_methods(tmp_path, isolated_registry):
    path = plugin_config(tmp_path, PLUGIN.format(name="mine", section="mine"), "align: {method: mien}\n")
    with pytest.raises(BoosterInputError, match=r"expected one of sft, .*mine, got 'mien' \(did you mean 'mine'"):
        load_config(path)


def test_an_unknown_method_names_a_plugin_file_that_registered_nothing(tmp_path, isolated_registry):
    """The usual mistake behind an unknown plugin method: the file imported but its register call never ran."""
    path = plugin_config(tmp_path, "import booster_jax as bj\n\ndef forgot():\n    pass\n", "align: {method: mine}\n")
    with pytest.raises(BoosterInputError, match=r"got 'mine' \(run.plugins: \S*/defense.py registered no method; "
                                                r"a defense file calls booster_jax.register"):
        load_config(path)
    path = plugin_config(tmp_path, PLUGIN.format(name="mine", section="mine"), "align: {method: mien}\n")
    with pytest.raises(BoosterInputError) as err:  # a file that registered its method is not blamed
        load_config(path)
    assert "registered no method" not in str(err.value)


def test_a_method_of_the_other_stage_says_which_key_takes_it(tmp_path):
    path = write(tmp_path / "run.yaml", f"base: {os.path.abspath(SMOKE)}\nalign: {{method: lisa}}\n"
                                         "finetune: {method: booster}\n")
    with pytest.raises(BoosterInputError) as err:
        load_config(str(path))
    assert "align.method: expected one of" in str(err.value)
    assert "got 'lisa' ('lisa' is a finetune method: finetune.method=lisa)" in str(err.value)
    assert "got 'booster' ('booster' is an align method: align.method=booster)" in str(err.value)


def test_a_plugin_that_fails_to_import_is_named_with_its_line(tmp_path, isolated_registry):
    path = plugin_config(tmp_path, "import booster_jax\n\nx = undefined_name\n")
    with pytest.raises(BoosterInputError) as e:
        load_config(path)
    assert f"run.plugins[0]: {tmp_path / 'defense.py'}: cannot import it: NameError" in str(e.value)
    assert "(line 3)" in str(e.value)


@pytest.mark.parametrize("entry, expected", [
    ("folder", "a directory; a plugin is a .py file or an importable module name (my_pkg.defenses)"),
    ("c.yaml", "not a Python file; a plugin is a .py file or an importable module name"),
    ("missing.py", "cannot import it: FileNotFoundError: no such file"),
])
def test_a_plugin_entry_that_is_not_a_python_file_says_what_it_is(tmp_path, isolated_registry, entry, expected):
    (tmp_path / "folder").mkdir()
    write(tmp_path / "c.yaml", "align: {method: sft}\n")
    with pytest.raises(BoosterInputError) as e:
        load_config(None, [f"run.plugins=[{tmp_path / entry}]"])
    assert f"run.plugins[0]: {tmp_path / entry}: {expected}" in str(e.value)


@pytest.mark.parametrize("name, section, expected", [
    ("booster", "mine", "align method 'booster' is registered already by booster-jax (built in)"),
    ("mine", "optim", "align.optim is a built-in key"),
    ("mine", "Bad-Name", "expected a lower-case identifier"),
])
def test_a_bad_registration_is_one_error_naming_the_file(tmp_path, isolated_registry, name, section, expected):
    path = plugin_config(tmp_path, PLUGIN.format(name=name, section=section))
    with pytest.raises(BoosterInputError) as e:
        load_config(path)
    assert f"run.plugins[0]: {tmp_path / 'defense.py'}: " in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize("section_class, expected", [
    ("@dataclasses.dataclass\nclass S:\n    x: int = 1\n", "expected frozen=True"),
    ("@dataclasses.dataclass(frozen=True)\nclass S:\n    x: int\n", "align.mine.x: expected a default value"),
    ("@dataclasses.dataclass(frozen=True)\nclass S:\n    x: dict = None\n", "align.mine.x: type <class 'dict'> is not"),
    ("class S:\n    x = 1\n", "expected a dataclass"),
])
def test_a_bad_section_is_named(tmp_path, isolated_registry, section_class, expected):
    body = ("import dataclasses\nimport booster_jax as bj\n" + section_class +
            "bj.register(bj.MethodSpec(name='mine', stage='align', streams=('align',), make_step=bj.make_sft_step,"
            " config_section='mine', config_class=S))\n")
    with pytest.raises(BoosterInputError, match="bad config section") as e:
        load_config(plugin_config(tmp_path, body))
    assert "defense.py" in str(e.value) and expected in str(e.value)


def test_two_plugins_registering_one_name(tmp_path, isolated_registry):
    write(tmp_path / "one.py", PLUGIN.format(name="mine", section="mine"))
    write(tmp_path / "two.py", PLUGIN.format(name="mine", section="other"))
    with pytest.raises(BoosterInputError) as e:
        load_config(SMOKE, [f"run.plugins=[{tmp_path / 'one.py'}, {tmp_path / 'two.py'}]"])
    assert f"run.plugins[1]: {tmp_path / 'two.py'}: align method 'mine' is registered already by " \
           f"{os.path.realpath(tmp_path / 'one.py')}" in str(e.value)


def test_the_same_file_imported_again_after_an_edit_replaces_its_method(tmp_path, isolated_registry):
    path = plugin_config(tmp_path, PLUGIN.format(name="mine", section="mine"))
    load_config(path)
    write(tmp_path / "defense.py", PLUGIN.format(name="mine", section="mine").replace("1.0, bj.POS", "7.0, bj.POS"))
    assert load_config(path).align.mine.scale == 7.0


def test_a_module_plugin_and_an_entry_point(tmp_path, isolated_registry, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "mypkg").mkdir(parents=True)
    write(pkg / "mypkg" / "__init__.py", "")
    write(pkg / "mypkg" / "mod.py", PLUGIN.format(name="by_module", section="by_module"))
    write(pkg / "entry.py", PLUGIN.format(name="by_entry_point", section="by_entry_point"))
    dist = pkg / "my_defenses-0.1.dist-info"
    dist.mkdir()
    write(dist / "METADATA", "Metadata-Version: 2.1\nName: my-defenses\nVersion: 0.1\n")
    write(dist / "entry_points.txt", "[booster_jax.methods]\nby_entry_point = entry\n")
    monkeypatch.syspath_prepend(str(pkg))
    cfg = load_config(SMOKE, ["run.plugins=[mypkg.mod]", "align.method=by_entry_point"])
    assert cfg.align.by_module.scale == 1.0 and cfg.align.by_entry_point.scale == 1.0
    assert get_method("by_module", "align").source == os.path.realpath(pkg / "mypkg" / "mod.py")
    assert get_method("by_entry_point", "align").source == os.path.realpath(pkg / "entry.py")


def test_a_failing_entry_point_is_named(tmp_path, isolated_registry, monkeypatch):
    dist = tmp_path / "broken-0.1.dist-info"
    dist.mkdir()
    write(dist / "METADATA", "Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    write(dist / "entry_points.txt", "[booster_jax.methods]\nbroken = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BoosterInputError, match=r"booster_jax.methods entry point: broken = no_such_module_here "
                                                r".*ModuleNotFoundError"):
        load_config(SMOKE)


def test_a_variant_may_not_override_plugins(tmp_path, isolated_registry):
    with pytest.raises(BoosterInputError, match="grid.variants.x: a variant may not override run.plugins"):
        load_config(SMOKE, ["grid.variants={x: {run.plugins: [a.py]}}"])


def test_run_py_methods_lists_a_plugin_with_its_section(tmp_path, isolated_registry, capsys):
    path = plugin_config(tmp_path, PLUGIN.format(name="mine", section="mine"), "align: {mine: {scale: 4}}\n")
    assert cli.main(["methods", path]) == 0
    out = capsys.readouterr().out
    assert f"mine                 streams align; {os.path.realpath(tmp_path / 'defense.py')}" in out
    assert "align.mine: scale=4.0, tags=['a']" in out and "booster              streams align, harmful; built in" in out


def test_fingerprints_see_a_plugin_source_and_only_its_own_section(tmp_path, isolated_registry):
    """Loading a plugin leaves a built-in method's fingerprint parts as they were; the plugin's own stage
    depends on its source file and its section, and another plugin section is not part of it."""
    before = config_parts(load_config(SMOKE), ["align"])["config align"]
    path = plugin_config(tmp_path, PLUGIN.format(name="mine", section="mine"))
    write(tmp_path / "other.py", PLUGIN.format(name="other", section="other"))
    sft = load_config(path, [f"run.plugins=[{tmp_path / 'defense.py'}, {tmp_path / 'other.py'}]"])
    assert method_parts(sft, "align") == {"config align": before}
    mine = load_config(path, [f"run.plugins=[{tmp_path / 'defense.py'}, {tmp_path / 'other.py'}]",
                              "align.method=mine"])
    parts = method_parts(mine, "align")
    source = f"align method mine (source)"
    assert set(parts) == {"config align", "config align.mine", source}
    changed_other = load_config(path, [f"run.plugins=[{tmp_path / 'defense.py'}, {tmp_path / 'other.py'}]",
                                       "align.method=mine", "align.other.scale=9"])
    assert method_parts(changed_other, "align") == parts  # another plugin's setting is not this stage's input
    write(tmp_path / "defense.py", PLUGIN.format(name="mine", section="mine") + "# edited\n")
    assert method_parts(mine, "align")[source] != parts[source]
