"""Parity with the authors' implementation (golden outputs in ../shared/parity/golden),
for the eager model and for the accelerated one."""

import pytest
from parity import check_train_golden, golden_eval_error

import transxnet

BUILDERS = {
    "eager": transxnet.transxnet_t,
    "accelerated": lambda: transxnet.accelerated("transxnet_t"),
}


@pytest.mark.parametrize("path", sorted(BUILDERS))
def test_eval_logits_match_golden_fp32(path):
    assert golden_eval_error(BUILDERS[path]()) <= 1e-5


@pytest.mark.parametrize("path", sorted(BUILDERS))
def test_train_logits_and_all_gradients_match_golden_fp64(path):
    check_train_golden(BUILDERS[path]())
