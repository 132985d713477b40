import subprocess
import sys


def test_cxrbase_imports_no_higher_floor():
    code = (
        "import sys, cxrbase; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'augment', 'generators', 'classifiers', 'hydra', 'omegaconf', 'ray', 'optuna'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
