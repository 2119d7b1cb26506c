"""Study files: frozen dataclasses, one-line errors naming the file and the key, typed overrides."""

import dataclasses

import pytest

from bench.study import StudyError, config_hash, list_studies, load_study


def write(tmp_path, text, name="demo"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


GOOD = """
model: vgg16_bn_cifar
dataset: fashion-mnist
methods: [l1_filter, magnitude]
ratios: [2, 4, "[0.5]*12"]
finetune: {epochs: 2, lr: 0.01}
"""


def test_shipped_studies_load():
    names = list_studies()
    for required in ("smoke", "quickstart", "vgg16-cifar", "resnet56-cifar"):
        assert required in names
    for name in names:
        study = load_study(name)
        assert study.name == name
        assert study.methods and study.ratios and study.seeds


def test_load_and_freeze(tmp_path):
    study = load_study(str(write(tmp_path, GOOD)))
    assert study.name == "demo"
    assert study.ratios == (2.0, 4.0, "[0.5]*12")
    assert study.finetune.epochs == 2.0 and isinstance(study.finetune.epochs, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.model = "x"


def test_override_is_type_checked(tmp_path):
    path = str(write(tmp_path, GOOD))
    study = load_study(path, ("finetune.epochs=1", "seeds=[0, 1]", "methods=[random]"))
    assert study.finetune.epochs == 1.0 and study.seeds == (0, 1) and study.methods == ("random",)
    with pytest.raises(StudyError, match=r"finetune\.epochs must be float"):
        load_study(path, ("finetune.epochs=many",))
    with pytest.raises(StudyError, match="did you mean 'finetune'"):
        load_study(path, ("finetun.epochs=1",))
    with pytest.raises(StudyError, match="KEY=VALUE"):
        load_study(path, ("finetune.epochs",))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "colour: red\n", "unknown key 'colour'"),
        (GOOD.replace("finetune: {epochs: 2", "finetune: {epoch: 2"), "did you mean 'epochs'"),
        (GOOD.replace("ratios: [2, 4", "ratios: [1, 4"), r"ratios\[0\] = 1.0 must be a number > 1"),
        (GOOD.replace("[2, 4", "[-3, 4"), "must be a number > 1"),
        (GOOD.replace("methods: [l1_filter, magnitude]", "methods: []"), "methods is empty"),
        (GOOD.replace('"[0.5]*12"', '"[1.5]*12"'), "outside"),
        (GOOD.replace("model: vgg16_bn_cifar\n", ""), "missing required key"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_studies_one_line_with_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(StudyError, match=expected) as err:
        load_study(str(path))
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message or "--set" in message


def test_unknown_study_did_you_mean():
    with pytest.raises(StudyError, match="did you mean 'quickstart'"):
        load_study("quickstrat")


def test_config_hash_is_stable_and_sensitive():
    a = {"b": 1, "a": [1, 2]}
    assert config_hash(a) == config_hash({"a": [1, 2], "b": 1})
    assert config_hash(a) != config_hash({"a": [1, 2], "b": 2})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("tuning.sampler=cmaes", "tuning.sampler 'cmaes' must be one of ('tpe', 'random')"),
        ("tuning.pruner=hyperband", "tuning.pruner 'hyperband' must be one of ('median', 'none')"),
    ],
)
def test_unknown_sampler_or_pruner_is_a_one_line_study_error(tmp_path, override, expected):
    path = str(write(tmp_path, GOOD))
    with pytest.raises(StudyError) as err:
        load_study(path, (override,))
    assert str(err.value) == f"{path}: tuning: {expected}"


def test_every_registered_sampler_and_pruner_builds():
    import optuna

    from bench.samplers import PRUNERS, SAMPLERS, pareto_sampler
    from bench.study import TuningConfig

    for name, factory in SAMPLERS.items():
        assert isinstance(
            factory(TuningConfig(sampler=name, trials=4)), optuna.samplers.BaseSampler
        )
    for name, factory in PRUNERS.items():
        assert isinstance(factory(TuningConfig(pruner=name)), optuna.pruners.BasePruner)
    assert isinstance(pareto_sampler(TuningConfig(mode="pareto")), optuna.samplers.NSGAIISampler)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (("data.val_size=0",), "data.val_size must be >= 1, not 0"),
        (("data.val_size=60000",), "data.val_size must be in [1, 59999] for 60000 images"),
        (("data.test_subset=10001",), "data.test_subset must be in [1, 10000]"),
        (("data.train_subset=10", "baseline.batch_size=11"), "11 is more than the 10 training"),
        (("data.train_subset=100", "finetune.epochs=0.1"), "1 batches of 64 per epoch, 100 images"),
        (("dataset=cifar11",), "dataset: unknown dataset 'cifar11'"),
    ],
)
def test_data_that_would_measure_nothing_is_refused_with_the_numbers(overrides, expected):
    from bench.study import check_data

    with pytest.raises(StudyError) as err:
        check_data(load_study("smoke", overrides))
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ("baseline.epochs=0", "finetune.epochs=0", "data.train_subset=10"),  # no training asked
        ("dataset=imagenet",),  # its size is the folder's: checked when it is loaded
        ("data.train_subset=64", "baseline.batch_size=64", "finetune.batch_size=64"),
    ],
)
def test_data_that_trains_is_accepted(overrides):
    from bench.study import check_data

    check_data(load_study("smoke", overrides))


def test_split_sizes_are_those_load_splits_gives():
    import bench.data as bd
    from bench.dataset_info import dataset_info, split_sizes

    for kwargs in ({}, {"val_size": 16, "train_subset": 40, "test_subset": 8}):
        splits = bd.load_splits("synthetic", **kwargs)
        sizes = split_sizes(dataset_info("synthetic"), **kwargs)
        assert sizes == (len(splits.train), len(splits.val), len(splits.test))
