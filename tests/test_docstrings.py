"""The examples in the public docstrings run as written, by the standard library's doctest.

Each object's own docstring only (not its methods'), in a fresh namespace, so that every
example imports what it uses. An object whose docstring has no example that runs fails: the
test cannot pass by finding nothing.
"""
import doctest

import pytest

import tritonbn

DOCUMENTED = {
    "BatchNormAct1d": tritonbn.BatchNormAct1d,
    "BatchNormAct2d": tritonbn.BatchNormAct2d,
    "BatchNormAct3d": tritonbn.BatchNormAct3d,
    "SyncBatchNormAct": tritonbn.SyncBatchNormAct,
    "convert_sync_batchnorm": tritonbn.convert_sync_batchnorm,
    "bn_act": tritonbn.bn_act,
    "fuse_bn_act": tritonbn.fuse_bn_act,
    "FrozenBatchNormAct2d": tritonbn.FrozenBatchNormAct2d,
    "freeze_batch_norm": tritonbn.freeze_batch_norm,
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_docstring_examples(name):
    tests = doctest.DocTestFinder(recurse=False).find(DOCUMENTED[name], f"tritonbn.{name}",
                                                      globs={})
    run = [example for test in tests for example in test.examples
           if not example.options.get(doctest.SKIP)]
    assert run, f"tritonbn.{name}'s docstring has no examples that run"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)
    assert results.attempted >= len(run)
