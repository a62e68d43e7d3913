import pytest

from pipeline.config import ConfigError, load_params, params_from_dict, section_hash
from tests.conftest import REPO


def test_repo_params_yaml_is_valid():
    p = load_params(REPO / "params.yaml")
    assert p.ingest.sources and p.ingest.sources[0].name == "sample"
    assert p.dedup.hamming_threshold == 6


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as e:
        params_from_dict({"dedup": {"hamming_treshold": 4}})
    msg = str(e.value)
    assert "dedup.hamming_treshold" in msg and "hamming_threshold" in msg and "across_identities" in msg


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match="unknown key 'ingets'"):
        params_from_dict({"ingets": {}})


@pytest.mark.parametrize(
    "raw, where",
    [
        ({"dedup": {"hamming_threshold": "six"}}, "dedup.hamming_threshold"),
        ({"ingest": {"sources": [{"name": "a", "path": "b", "labeled": "yes"}]}}, "ingest.sources[0].labeled"),
        ({"runtime": {"executor": "spark"}}, "runtime.executor"),
        ({"ingest": {"extensions": ".jpg"}}, "ingest.extensions"),
    ],
)
def test_wrong_types_name_the_key(raw, where):
    with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
        params_from_dict(raw)


def test_source_requires_name_and_path():
    with pytest.raises(ConfigError, match="sources"):
        params_from_dict({"ingest": {"sources": [{"name": "x"}]}})


def test_section_hash_ignores_batch_size_only():
    a = params_from_dict({"dedup": {"hamming_threshold": 5}}).ingest
    b = params_from_dict({"ingest": {"batch_size": 99}}).ingest
    assert section_hash(a) == section_hash(b)
    c = params_from_dict({"ingest": {"min_side": 10}}).ingest
    assert section_hash(a) != section_hash(c)


def test_sections_are_registered_by_their_owners_not_listed_by_pipeline():
    from pipeline import plugins
    from pipeline.config import Params

    typed, raw = set(plugins.typed_sections()), set(plugins.raw_section_names())
    assert {"ingest", "align", "shards"} <= typed and {"train", "evaluate", "registry", "generate"} <= raw
    assert set(Params().sections) == typed
    with pytest.raises(AttributeError, match="no section 'nope'"):
        Params().nope


def test_raw_sections_are_validated_by_their_owners():
    from pipeline import plugins
    from pipeline.config import check_params

    checked = check_params(load_params(REPO / "params.yaml"))
    assert set(checked) == set(plugins.raw_section_names())
    with pytest.raises(ConfigError, match="train.bogus"):
        check_params(params_from_dict({"train": {"bogus": 1}}))
    with pytest.raises(ConfigError, match="evaluate.prompts"):
        check_params(params_from_dict({"evaluate": {"prompts": []}}))
    with pytest.raises(ConfigError, match="runtime: max_attempts"):
        params_from_dict({"runtime": {"max_attempts": 0}})
