"""Genre parsing, frequency filtering, the taxonomy and target encoding."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from stylegen.errors import DataError
from stylegen.sources.labels import (
    Taxonomy,
    encode_targets,
    filter_genres,
    frequent_genres,
    map_to_taxonomy,
    multi_labels,
    single_labels,
    split_genres,
    stratified_split,
)
from tests.conftest import COVERS_CSV, needs_real_data

TREE = {"rock": ["hard rock", "alternative rock"], "alternative rock": ["grunge", "indie rock"],
        "jazz": ["bebop", "swing"], "pop": []}


@pytest.fixture
def taxonomy() -> Taxonomy:
    return Taxonomy.from_tree(TREE)


@pytest.mark.parametrize(
    ("cell", "expected"),
    [("Rock| pop |rock", ["rock", "pop"]), ("hip-hop", ["hip-hop"]), ("", []), (None, []),
     (np.nan, []), (pd.NA, []), ("|jazz||", ["jazz"]), (["Jazz", "jazz "], ["jazz"])],
)
def test_split_genres(cell, expected):
    assert split_genres(cell) == expected


def test_split_genres_rejects_numbers():
    with pytest.raises(DataError, match="text"):
        split_genres(3)


def test_single_and_multi_labels():
    df = pd.DataFrame({"genre": ["Rock", None, "", None, "jazz"],
                       "genres": ["rock", "pop", "electronic|pop", None, "jazz|swing"]})
    assert single_labels(df).tolist() == ["rock", "pop", None, None, "jazz"]
    assert multi_labels(df) == [["rock"], ["pop"], ["electronic", "pop"], [], ["jazz", "swing"]]
    only_genre = pd.DataFrame({"genre": ["metal", np.nan]})
    assert single_labels(only_genre).tolist() == ["metal", None]
    assert multi_labels(only_genre) == [["metal"], []]
    with pytest.raises(DataError, match="'genre' or a 'genres'"):
        single_labels(pd.DataFrame({"style": ["x"]}))


def test_frequent_and_filter_genres():
    lists = [["a", "b"], ["a"], ["a", "c"], ["b", "a"], ["d"], [], ["b"], ["a", "a"], ["e"], ["c"]]
    # a: 6 items, b: 3, c: 2, d and e: 1 each, out of 10 items
    assert frequent_genres(lists, min_fraction=0.2) == ["a", "b", "c"]
    assert frequent_genres(lists, min_fraction=0.3) == ["a", "b"]
    assert frequent_genres(lists, min_fraction=0.0) == ["a", "b", "c", "d", "e"]
    assert filter_genres(lists[:5], ["a", "c"]) == [["a"], ["a"], ["a", "c"], ["a"], []]
    with pytest.raises(DataError):
        frequent_genres(lists, min_fraction=1.5)


def test_taxonomy_structure(taxonomy):
    assert taxonomy.roots == ("rock", "jazz", "pop")
    assert set(taxonomy.leaves) == {"hard rock", "grunge", "indie rock", "bebop", "swing", "pop"}
    assert taxonomy.parent("grunge") == "alternative rock"
    assert taxonomy.parent("rock") is None
    assert taxonomy.path("grunge") == ["rock", "alternative rock", "grunge"]
    assert [taxonomy.level_of(g) for g in ("rock", "hard rock", "grunge")] == [0, 1, 2]
    assert taxonomy.ancestor("grunge", 1) == "alternative rock"
    assert taxonomy.ancestor("hard rock", 5) == "hard rock"
    with pytest.raises(DataError, match="not in the taxonomy"):
        taxonomy.path("polka")


@pytest.mark.parametrize(
    ("tree", "message"),
    [({"rock": ["grunge"], "alternative": ["grunge"]}, "two parents"),
     ({"a": ["b"], "b": ["c"], "c": ["a"]}, "cycle"),
     ({"a": ["a"]}, "cycle"),
     ({"rock": "grunge"}, "list"),
     ({"rock": [None]}, "non-empty text"),
     ({"hip hop": [], "hip-hop": []}, "spells one genre twice"),
     (["rock"], "map each parent")],
)
def test_taxonomy_errors(tree, message):
    with pytest.raises(DataError, match=message):
        Taxonomy.from_tree(tree)


def test_taxonomy_load_yaml_json_and_bad_files(tmp_path):
    (tmp_path / "t.yaml").write_text("rock:\n  - Grunge\n  - hard rock\ngrunge: [seattle sound]\n")
    (tmp_path / "t.json").write_text(json.dumps(TREE))
    from_yaml = Taxonomy.load(tmp_path / "t.yaml")
    assert from_yaml.path("seattle sound") == ["rock", "grunge", "seattle sound"]
    assert Taxonomy.load(tmp_path / "t.json").parents == Taxonomy.from_tree(TREE).parents
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid"):
        Taxonomy.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="cannot read"):
        Taxonomy.load(tmp_path / "missing.yaml")


def test_default_taxonomy():
    taxonomy = Taxonomy.default()
    ours = ["country", "hip-hop", "rock", "electronic", "pop", "metal", "jazz", "classical",
            "reggae"]
    assert set(ours + ["blues", "folk", "r&b", "latin", "punk"]) <= set(taxonomy.roots)
    assert taxonomy.path("thrash metal") == ["metal", "thrash metal"]
    assert taxonomy.path("deep house") == ["electronic", "house", "deep house"]
    for root in taxonomy.roots:
        assert len(taxonomy.children[root]) >= 4, root
    assert all(name == name.lower().strip() for name in taxonomy.parents)


def test_find_spellings_and_suffixes(taxonomy):
    default = Taxonomy.default()
    assert default.find("Hip Hop") == "hip-hop"
    assert default.find("R and B") == "r&b"
    assert default.find("atl hip hop") is None
    assert default.find("atl hip hop", match_suffix=True) == "hip-hop"
    assert default.find("album rock", match_suffix=True) == "rock"
    assert taxonomy.find("Indie-Rock") == "indie rock"


def test_map_to_taxonomy(taxonomy):
    lists = [["grunge", "bebop"], ["indie rock", "hard rock"], ["polka"], ["modern grunge"]]
    assert map_to_taxonomy(lists, taxonomy) == [["rock", "jazz"], ["rock"], [], []]
    assert map_to_taxonomy(lists, taxonomy, level=1) == [
        ["alternative rock", "bebop"], ["alternative rock", "hard rock"], [], []]
    assert map_to_taxonomy(lists, taxonomy, level="parent")[0] == ["alternative rock", "jazz"]
    assert map_to_taxonomy(lists, taxonomy, keep_unknown=True)[2] == ["polka"]
    assert map_to_taxonomy(lists, taxonomy, match_suffix=True)[3] == ["rock"]
    with pytest.raises(DataError, match="level"):
        map_to_taxonomy(lists, taxonomy, level=-1)


def test_roll_up_is_consistent(taxonomy):
    classes = ["bebop", "grunge", "hard rock", "indie rock", "pop", "swing"]
    proba = np.random.default_rng(0).dirichlet(np.ones(len(classes)), size=20)
    top, top_classes = taxonomy.roll_up(proba, classes)
    assert top_classes == ["jazz", "pop", "rock"]
    np.testing.assert_allclose(top.sum(1), 1.0)
    np.testing.assert_allclose(top[:, 0], proba[:, 0] + proba[:, 5])
    np.testing.assert_allclose(top[:, 1], proba[:, 4])
    np.testing.assert_allclose(top[:, 2], proba[:, 1] + proba[:, 2] + proba[:, 3])
    mid, mid_classes = taxonomy.roll_up(proba, classes, level=1)
    assert mid_classes == ["alternative rock", "bebop", "hard rock", "pop", "swing"]
    np.testing.assert_allclose(mid[:, 0], proba[:, 1] + proba[:, 3])
    # the top level is also the roll-up of the middle level
    np.testing.assert_allclose(taxonomy.roll_up(mid, mid_classes)[0], top)
    with pytest.raises(DataError, match="not in the taxonomy"):
        taxonomy.roll_up(proba, classes[:-1] + ["polka"])
    with pytest.raises(DataError, match="shape"):
        taxonomy.roll_up(proba[:, :3], classes)


def test_encode_targets():
    targets, classes = encode_targets(np.array(["b", "a", "b"], dtype=object), False)
    assert classes.tolist() == ["a", "b"] and targets.tolist() == [1, 0, 1]
    matrix, labels = encode_targets([["x", "y"], ["y"], []], True)
    assert labels.tolist() == ["x", "y"]
    assert matrix.tolist() == [[1, 1], [0, 1], [0, 0]]
    with pytest.raises(DataError, match="no label"):
        encode_targets(["a", None, "b"], False)
    with pytest.raises(DataError, match="list of label lists"):
        encode_targets(["a", "b"], True)
    with pytest.raises(DataError, match="multi_label=True"):
        encode_targets([["a"], ["b"]], False)
    with pytest.raises(DataError, match="3 labels for 4"):
        encode_targets(["a", "b", "a"], False, n_rows=4)
    with pytest.raises(DataError, match="at least 2 classes"):
        encode_targets(["a", "a"], False)


def test_stratified_split_keeps_proportions():
    targets = np.repeat([0, 1, 2], [60, 30, 10])
    train, val = stratified_split(targets, 0.2, random_state=0)
    assert len(val) == 20 and not set(train) & set(val)
    assert np.bincount(targets[val]).tolist() == [12, 6, 2]
    again = stratified_split(targets, 0.2, random_state=0)[1]
    np.testing.assert_array_equal(np.sort(val), np.sort(again))
    assert len(stratified_split(targets, 0.0)[1]) == 0
    with pytest.raises(DataError, match="fraction"):
        stratified_split(targets, 1.0)
    label_sets = np.array([[1, 0], [0, 1], [1, 1]] * 10)
    train, val = stratified_split(label_sets, 0.3, random_state=0)
    assert sorted(map(tuple, label_sets[val].tolist())) == [(0, 1)] * 3 + [(1, 0)] * 3 + [(1, 1)] * 3


@needs_real_data()
@pytest.mark.realdata
def test_real_covers_labels():
    df = pd.read_csv(COVERS_CSV)
    single = single_labels(df)
    multi = multi_labels(df)
    assert single.isna().sum() == sum(len(g) > 1 for g in multi)
    assert set(single.dropna()) <= set(Taxonomy.default().roots)


def test_the_stored_taxonomy_spells_genres_as_the_data_does():
    """GTZAN says ``hiphop``, the packaged taxonomy ``hip-hop``: the tree stored with the heads
    must not hold both (evaluate refused it: 'taxonomy spells one genre twice')."""
    from stylegen.heads.train import taxonomy_tree

    tree = taxonomy_tree(Taxonomy.default(), ["hiphop", "rock", "blues", "noise"])
    tax = Taxonomy.from_tree(tree)
    assert "hiphop" in tax and "hip-hop" not in tax and "noise" in tax
    assert tax.parent("trap") == "hiphop" and tax.path("hiphop") == ["hiphop"]


def test_covers_are_grouped_by_artist_else_by_artist_group():
    """The Discogs covers carry ``artist_group``, not ``artist``: CV and validation splits must
    keep a group on one side (grouping by row would let an artist's covers vote for each other)."""
    from stylegen.heads.train import artist_groups

    discogs = pd.DataFrame({"artist_group": ["block000", "block000", "block001"], "album": ["a", "b", "c"]})
    assert artist_groups(discogs).tolist() == ["block000", "block000", "block001"]
    both = pd.DataFrame({"artist": ["Abba", None, "abba "], "artist_group": ["x", "y", "z"]})
    assert artist_groups(both).tolist() == ["abba", "#row1", "abba"]
    assert artist_groups(both, "artist_group").tolist() == ["x", "y", "z"]
    with pytest.raises(DataError, match="no column 'label'"):
        artist_groups(both, "label")


def test_packaged_covers9_map_sends_every_genre_to_discogs_labels_the_taxonomy_knows(tmp_path):
    """The 9 genres of ../shared/data/covers map onto Discogs genres (metal: Rock and its
    generic metal style); every target is in the packaged Discogs taxonomy, an unknown label is
    dropped (or kept), and a bad map file is a one-line DataError."""
    from stylegen.sources.labels import Taxonomy, label_map, map_labels

    mapping = label_map("covers9-discogs")
    assert set(mapping) == {"rock", "electronic", "hip-hop", "pop", "jazz", "classical", "reggae", "country", "metal"}
    tax = Taxonomy.discogs()
    assert all(tax.find(t) is not None for targets in mapping.values() for t in targets)
    assert map_labels([["metal"], ["hip-hop", "polka"]], mapping) == [["rock", "rock---heavy metal"], ["hip hop"]]
    assert map_labels([["polka"]], mapping, keep_unknown=True) == [["polka"]]
    bad = tmp_path / "m.json"
    bad.write_text('{"rock": 3}')
    with pytest.raises(DataError, match="must map to a label"):
        label_map(bad)
