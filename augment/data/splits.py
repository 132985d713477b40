"""Patient-level splits: no patient ever appears in two splits."""

from __future__ import annotations

import numpy as np

from augment.errors import UserError


def split_by_patient(
    patient_ids: np.ndarray, *, val: float = 0.1, test: float = 0.2, seed: int = 0,
    fixed: np.ndarray | None = None,
) -> np.ndarray:
    """Assign every row to train/val/test so that each patient lies in exactly one split.

    Args:
        patient_ids: N patient ids.
        val: share of patients for validation.
        test: share of patients for test.
        seed: seeds the permutation of patients (a local generator; global state is untouched).
        fixed: optional N array of official split names (``train``/``val``/``test`` or empty);
            rows with a name keep it (patients split across official names keep the name of the
            row), the rest are assigned by patient. ``train_val`` official rows are divided into
            train and val by patient.

    Returns:
        N array of split names.
    """
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise UserError(f"bad split fractions val={val} test={test}: each in [0, 1) and val + test < 1")
    pids = np.asarray(patient_ids).astype(str)
    out = np.full(len(pids), "", dtype=object)
    if fixed is not None:
        fixed = np.asarray(fixed).astype(str)
        for name in ("train", "val", "test"):
            out[fixed == name] = name
    # Patients still to assign, in a seeded order.  Rows of an official train_val patient may only
    # go to train or val.
    todo = out == ""
    trainval_only = np.zeros(len(pids), dtype=bool) if fixed is None else (fixed == "train_val")
    rng = np.random.default_rng(seed)
    free_p = np.unique(pids[todo & ~trainval_only])
    tv_p = np.unique(pids[todo & trainval_only])
    tv_p = np.setdiff1d(tv_p, free_p)
    assign: dict[str, str] = {}
    perm = rng.permutation(free_p)
    n_test = int(round(test * len(perm)))
    n_val = int(round(val * len(perm)))
    for k, p in enumerate(perm):
        assign[p] = "test" if k < n_test else ("val" if k < n_test + n_val else "train")
    perm_tv = rng.permutation(tv_p)
    n_val_tv = int(round(val / max(1e-9, 1 - test) * len(perm_tv)))
    for k, p in enumerate(perm_tv):
        assign[p] = "val" if k < n_val_tv else "train"
    for i in np.flatnonzero(todo):
        out[i] = assign[pids[i]]
    return out.astype(str)
