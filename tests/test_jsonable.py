"""mdlens.jsonable: what JSON cannot hold becomes null; everything else is kept exactly."""

import json
import math

import torch

from mdlens.jsonable import json_ready


def test_non_finite_floats_become_null_and_the_rest_is_kept():
    record = {"r2": math.nan, "kl": math.inf, "low": -math.inf, "n": 3, "name": "L2", "flag": True, "x": 0.25}
    assert json_ready(record) == {"r2": None, "kl": None, "low": None, "n": 3, "name": "L2", "flag": True, "x": 0.25}


def test_tensors_nested_containers_and_keys():
    record = {1: (torch.tensor([0.5, float("nan")]), [math.inf, {"a": torch.tensor(2)}])}
    ready = json_ready(record)
    assert ready == {"1": [[0.5, None], [None, {"a": 2}]]}
    # Strict JSON: no NaN or Infinity token is written.
    assert json.loads(json.dumps(ready, allow_nan=False)) == ready
