"""Every shipped config passes the pre-compilation checks; the ImageNet ones say what data is missing."""
import glob
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT
from kindjax.config import ConfigError
from kindjax.data import class_groups as cg
from kindjax.papers.kind import classes as kc
from kindjax.archs import DIT_ARCHS
from kindjax.models.dit import abstract_params, build_model
from kindjax.sharding import mesh_shape
from kindjax.train.stages import check


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


@pytest.mark.parametrize("name, hidden, paper_n_learngene, n_tailor", [("kind_dit_b", 768, 318, 3),
                                                                       ("kind_dit_l", 1024, 424, 4)])
def test_kind_imagenet_configs_pretrain_on_the_kind_split_and_fill_the_rank(name, hidden, paper_n_learngene,
                                                                             n_tailor):
    config = load(name)
    linear, n_cls = config.model.linear, len(kc.kind_pretrain_classes())
    assert (config.data.grouping, config.data.task) == ("kind", "pretrain")
    assert config.train.num_steps == 300_000            # §4.2 (Table 6's 200K is an override)
    assert load(f"dit_{name[-1]}").train.num_steps == 400_000   # plain DiT keeps DiT's 400K
    assert config.model.num_classes == n_cls and "n_classes" not in linear
    assert linear.n_tailor == n_tailor and n_cls * n_tailor + linear.n_learngene == hidden
    assert hidden - 150 * n_tailor == paper_n_learngene   # the paper's N_G with its 150 classes
    build_model(config)  # the KIND factory checks the rank of all six matrices here
    # grouped on a TPU (tests/test_preflight.py), DiT-L's train state split over any number of devices
    assert linear.formulation == "auto"
    split = name == "kind_dit_l"
    assert [mesh_shape(n, config.mesh.data, config.mesh.fsdp) for n in (1, 4, 8)] == [
        (1, 1), (1, 4) if split else (4, 1), (1, 8) if split else (8, 1)]
    with pytest.raises(ConfigError, match="ImageNet-1K"):
        check(config)
    config.model.linear.n_learngene += 1
    with pytest.raises(ValueError, match=f"r = N_cls·N_T \\+ N_G = {n_cls}·{n_tailor} \\+ {linear.n_learngene}"):
        build_model(config)


@pytest.mark.parametrize("name", ["kind_dit_b", "kind_dit_l"])
def test_kind_imagenet_task_specs_select_the_task_and_the_method(name):
    import importlib

    get_config = importlib.import_module(f"configs.{name}").get_config
    pretrain = get_config()
    for k, classes in enumerate(kc.kind_tasks().values(), start=1):
        config = get_config(f"task_{k}")
        assert (config.data.task, config.model.num_classes) == (f"task_{k}", len(classes))
        assert config.model.linear.n_learngene == pretrain.model.linear.n_learngene
        assert "n_classes" not in config.model.linear and config.train.freeze_learngene
        assert (config.optim.lr, config.train.num_steps) == (1e-3, 50_000)
        build_model(config)
    with pytest.raises(ConfigError, match="init.learngene to a KIND pre-training workdir"):
        check(get_config("task_2"))
    config = get_config("task_2")
    config.init.learngene = "/pretrain"
    with pytest.raises(ConfigError, match="ImageNet-1K"):   # past the config checks, to the data
        check(config)

    lora = get_config("task_5,lora")
    rank = len(kc.kind_tasks()["task_5"]) * pretrain.model.linear.n_tailor
    assert (lora.model.linear.kind, lora.model.linear.rank, lora.train.batch_size) == ("lora", rank, 512)
    oft = get_config("task_1,oft")
    assert (oft.model.linear.kind, oft.model.linear.r, oft.optim.lr) == ("oft", 21, 1e-4)
    assert oft.model.linear.block_fit == "pad"         # Table 7's 21 blocks kept (Table 2's count)
    build_model(oft)
    loha = get_config("task_5,loha")
    assert (loha.model.linear.rank, loha.model.linear.alpha) == (rank // 2, float(rank // 2))
    assert get_config("task_4,svdiff").optim.lr == (3e-3 if name == "kind_dit_l" else 5e-3)
    with pytest.raises(ValueError, match="task_1..task_18"):
        get_config("task_19")
    with pytest.raises(ValueError, match="unknown method 'lorra'"):
        get_config("task_1,lorra")


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
    assert out.stderr.strip().splitlines()[-1].startswith("kindjax.main: config.data.name='imagenet' needs ImageNet-1K")
    assert "Traceback" not in out.stderr


@pytest.mark.slow  # 26 s (-n 2, 2 cores)
def test_kind_domain_shift_configs_build_for_every_table3_cell():
    """KIND Table 3: every data set × method × arch is a folder config; the models build (shape-only)."""
    import importlib

    from configs.downstream_data import DATASETS
    from kindjax.papers.kind.methods import METHODS
    from kindjax import params as param_rules

    from kindjax.papers.kind import facts

    shift = importlib.import_module("configs.kind_domain_shift")
    assert set(facts.TABLE3_METHODS) <= set(METHODS) and set(facts.TABLE3_DATASETS) <= set(DATASETS)
    for arch, n_tailor in (("B", 3), ("L", 4)):
        pretrain = load(f"kind_dit_{arch.lower()}")
        for method in facts.TABLE3_METHODS:
            counts = set()
            for dataset in DATASETS:
                config = shift.get_config(f"{dataset},{method},{arch}")
                assert (config.data.name, config.data.grouping, config.data.classes) == ("folder", "", ())
                assert config.model.num_classes == 1 and config.train.num_steps == 50_000
                assert config.model.arch == arch and config.model.in_channels == 4
                counts.add(config.model.linear.to_json())
            assert len(counts) == 1        # the data set changes the data, never the model
            params = abstract_params(build_model(config))
            if method == "kind":
                linear = config.model.linear
                assert (linear.n_learngene, linear.n_tailor) == (pretrain.model.linear.n_learngene, n_tailor)
                assert config.train.freeze_learngene and config.optim.lr == 1e-3
                tailors = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                           if param_rules.is_tailor(path)]
                assert tailors and all(leaf.shape[0] == 1 for leaf in tailors)   # one tailor set
            elif method in ("lora", "pissa", "dora"):
                assert config.model.linear.rank == n_tailor      # N·N_T with N = 1 class
    with_classes = shift.get_config("mri,kind,classes=4")
    assert with_classes.model.num_classes == 4
    build_model(with_classes)
    for bad, says in (("celeba", "the data set is one of"), ("mri,lorra", "unknown token 'lorra'"),
                      ("mri,classes=x", "classes='x' must be a positive")):
        with pytest.raises(ConfigError, match=says):
            shift.get_config(bad)
    config = shift.get_config("hubble")
    config.init.learngene = "/pretrain"
    with pytest.raises(ConfigError, match="encode the folder once .* set data.latents"):   # past the config checks
        check(config)


def test_fine_downstream_configs_have_table8_settings():
    """FINE's six downstream sets (supplementary Table 8): steps, batch 64, lr 1e-4, FID or FDD."""
    import importlib

    from configs.downstream_data import DATASETS

    fine = importlib.import_module("configs.fine_downstream")
    steps = {"celebahq": 100_000, "bedroom": 150_000, "church": 150_000, "hubble": 20_000, "mri": 20_000,
             "pokemon": 20_000}
    assert {d: DATASETS[d].fine_steps for d in DATASETS} == steps
    assert {d for d in DATASETS if DATASETS[d].metric == "fid"} == {"celebahq", "bedroom", "church"}
    for dataset in DATASETS:
        for arch in ("B", "L"):
            for model in ("fine", "dense"):
                config = fine.get_config(f"{dataset},{arch},{model}")
                assert config.train.num_steps == steps[dataset] and config.train.batch_size == 64
                assert (config.optim.lr, config.optim.weight_decay) == (1e-4, 0.0)
                assert config.data.name == "folder" and config.model.num_classes == 1
                assert config.model.linear.kind == model
                if model == "fine":
                    assert config.model.linear.rank == {"B": 100, "L": 148}[arch]
                assert config.model.drop_path == 0.1
    for arch in ("B", "L"):
        for model in ("fine", "dense"):
            abstract_params(build_model(fine.get_config(f"pokemon,{arch},{model}")))
    assert fine.get_config("mri,classes=3").model.num_classes == 3
    with pytest.raises(ConfigError, match="unknown token 'XL'"):
        fine.get_config("mri,XL")
