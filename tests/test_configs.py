"""Every shipped config passes the pre-compilation checks; the ImageNet ones say what data is missing."""
import glob
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (config files are plain modules)

from conftest import ROOT
from kindjax.config import ConfigError
from kindjax.models.dit import DIT_ARCHS, build_model
from kindjax.run import check


def load(name):
    import importlib

    return importlib.import_module(f"configs.{name}").get_config()


CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_") and "get_config" in open(p).read())


@pytest.mark.parametrize("name", ["dit_s", "dit_b", "dit_l", "dit_xl"])
def test_imagenet_configs_have_the_paper_settings_and_name_the_missing_data(name):
    config = load(name)
    arch = name.split("_")[1].upper()
    assert config.model.arch == arch and config.model.image_size == 32 and config.model.in_channels == 4
    assert (config.train.batch_size, config.optim.lr, config.optim.weight_decay) == (256, 1e-4, 0.0)
    assert DIT_ARCHS[arch][0] % DIT_ARCHS[arch][2] == 0
    with pytest.raises(ConfigError, match="ImageNet-1K .*configs/default.py"):
        check(config)


@pytest.mark.parametrize("name, hidden, n_learngene, n_tailor", [("kind_dit_b", 768, 318, 3),
                                                                 ("kind_dit_l", 1024, 424, 4)])
def test_kind_imagenet_configs_fill_the_rank_exactly(name, hidden, n_learngene, n_tailor):
    config = load(name)
    linear = config.model.linear
    assert (linear.n_learngene, linear.n_tailor, linear.n_classes) == (n_learngene, n_tailor, 150)
    assert DIT_ARCHS[config.model.arch][0] == hidden == 150 * n_tailor + n_learngene
    build_model(config)  # the KIND factory checks the rank of all six matrices here
    config.model.linear.n_learngene += 1
    with pytest.raises(ValueError, match=f"r = N_cls·N_T \\+ N_G = 150·{n_tailor} \\+ {n_learngene + 1}"):
        build_model(config)


def test_every_digits_config_passes_the_checks():
    for name in CONFIGS:
        config = load(name)
        if config.data.name == "digits":
            check(config)


def test_cli_reports_missing_imagenet_without_a_traceback(tmp_path):
    env = dict(os.environ, XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-m", "kindjax.main", "--config", "configs/dit_xl.py",
                          "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("kindjax: config.data.name='imagenet' needs ImageNet-1K")
    assert "Traceback" not in out.stderr
