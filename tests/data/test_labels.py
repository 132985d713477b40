import math

import numpy as np
import pytest

from augment.data.labels import (
    FINDINGS, NO_FINDING, VOCABULARY, UnknownClassError, canonical, finding_string, multi_hot, parse_classes,
    parse_finding_labels,
)


def test_vocabulary_is_nih_spelling():
    assert len(FINDINGS) == 14 and VOCABULARY[-1] == NO_FINDING
    assert "Pleural_Thickening" in FINDINGS and "Effusion" in FINDINGS


@pytest.mark.parametrize("raw,expected", [
    ("edema", "Edema"), ("EDEMA", "Edema"), (" Hernia ", "Hernia"), ("pleural effusion", "Effusion"),
    ("pleural thickening", "Pleural_Thickening"), ("Pleural_Thickening", "Pleural_Thickening"),
    ("no finding", NO_FINDING), ("Infiltrate", "Infiltration"), ("normal", NO_FINDING),
])
def test_canonical_aliases(raw, expected):
    assert canonical(raw) == expected


def test_unknown_name_lists_valid_names_and_closest_match():
    with pytest.raises(UnknownClassError) as err:
        canonical("edma")
    msg = str(err.value)
    assert "did you mean 'Edema'" in msg
    assert all(name in msg for name in VOCABULARY)
    assert "\n" not in msg


def test_parse_classes_keeps_order_and_drops_repeats():
    assert parse_classes("edema,Hernia, edema") == ["Edema", "Hernia"]
    assert parse_classes(["pneumonia"]) == ["Pneumonia"]
    assert parse_classes(None) == []


def test_multi_hot_and_nan_for_unlabelled():
    v = multi_hot(["Edema", "Mass"])
    assert v[VOCABULARY.index("Edema")] == 1 and v[VOCABULARY.index("Mass")] == 1
    assert v.sum() == 2 and v[VOCABULARY.index(NO_FINDING)] == 0
    healthy = multi_hot([NO_FINDING])
    assert healthy[VOCABULARY.index(NO_FINDING)] == 1 and healthy.sum() == 1
    assert np.isnan(multi_hot([], labelled=False)).all()
    sub = multi_hot(["Edema"], ["Hernia", "Edema"])
    assert sub.tolist() == [0.0, 1.0]


def test_finding_string_round_trip():
    assert parse_finding_labels("Effusion|Mass") == ["Effusion", "Mass"]
    assert parse_finding_labels(float("nan")) == []
    assert finding_string(multi_hot(["Effusion", "Mass"])) == "Effusion|Mass"
    assert finding_string(multi_hot([])) == NO_FINDING
    assert math.isnan(float("nan"))
