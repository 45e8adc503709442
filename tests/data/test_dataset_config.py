"""Subsets: --dataset_config TOML, kohya N_prompt folders, per-example repeats (issue 16 item 1)."""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from flatlora_diffusion.data.dataset_config import load_dataset_config, resolve_subsets
from flatlora_diffusion.data.examples import subset_examples
from flatlora_diffusion.data.kohya_folders import parse_folder_name
from flatlora_diffusion.data.streams import BucketStream, SquareStream, repeated_indices
from flatlora_diffusion.errors import UserError
from flatlora_diffusion.training.config import TrainConfig


def images(folder, *names, size=(16, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, "red").save(folder / f"{name}.png")
    return folder


@pytest.mark.parametrize("name, expected", [("10_sks dog", (10, "sks dog")), ("3_a_b c", (3, "a_b c")),
                                            ("10", (10, None)), ("0_x", (0, "x")), ("dogs", None),
                                            ("_dog", None)])
def test_kohya_folder_names_split_at_the_first_underscore(name, expected):
    assert parse_folder_name(name) == expected


def test_kohya_parent_gives_one_subset_per_folder_and_ignores_the_rest(tmp_path, capsys):
    images(tmp_path / "10_sks dog", "a", "b")
    images(tmp_path / "2", "c")
    images(tmp_path / "notes", "d")
    images(tmp_path / "0_never", "e")
    config = TrainConfig(instance_data_dir=str(tmp_path), instance_prompt="a photo of sks")
    subsets = resolve_subsets(config)
    assert [(s.images.repeats, s.images.prompt) for s in subsets] == [(10, "sks dog"), (2, "a photo of sks")]
    err = capsys.readouterr().err
    assert "notes" in err and "0_never" in err and err.count("\n") == 1
    examples = subset_examples(subsets)
    assert [(e.path.name, e.prompt, e.repeats, e.subset) for e in examples] == [
        ("a.png", "sks dog", 10, 0), ("b.png", "sks dog", 10, 0), ("c.png", "a photo of sks", 2, 1)]


def test_kohya_folder_without_any_prompt_is_a_clear_error(tmp_path):
    images(tmp_path / "5", "a")
    config = TrainConfig(instance_data_dir=str(tmp_path))
    with pytest.raises(UserError, match="no prompt for .*a.png"):
        subset_examples(resolve_subsets(config))


def test_kohya_class_parent_is_one_pool_of_existing_images(tmp_path):
    images(tmp_path / "inst", "a")
    images(tmp_path / "reg" / "1_dog", "r1")
    images(tmp_path / "reg" / "3_a cat", "r2")
    config = TrainConfig(instance_data_dir=str(tmp_path / "inst"), instance_prompt="sks",
                         with_prior_preservation=True, class_data_dir=str(tmp_path / "reg"), class_prompt="x")
    (subset,) = resolve_subsets(config)
    pool = subset.classes
    assert not pool.generate and [(f.repeats, f.prompt) for f in pool.folders] == [(1, "dog"), (3, "a cat")]


@pytest.mark.parametrize("flags, refused", [({"repeats": 3}, "--repeats")])
def test_kohya_parent_refuses_repeats(tmp_path, flags, refused):
    images(tmp_path / "10_sks", "a")
    with pytest.raises(UserError, match=refused):
        resolve_subsets(TrainConfig(instance_data_dir=str(tmp_path), **flags))


def test_images_beside_kohya_folders_are_refused(tmp_path):
    images(tmp_path / "10_sks", "a")
    images(tmp_path, "loose")
    with pytest.raises(UserError, match="both images and N_prompt"):
        resolve_subsets(TrainConfig(instance_data_dir=str(tmp_path), instance_prompt="sks"))


def test_dataset_config_subsets_resolve_relative_to_the_file(tmp_path):
    images(tmp_path / "dog", "a")
    images(tmp_path / "cat", "b", "c")
    toml = tmp_path / "data.toml"
    toml.write_text('[[subsets]]\nfolder = "dog"\nprompt = "sks dog"\nrepeats = 4\nloss_weight = 2\n'
                    'class_folder = "class_dog"\nclass_prompt = "a dog"\nprior_loss_weight = 0.5\n\n'
                    '[[subsets]]\nfolder = "cat"\nprompt = "sks cat"\ncaption_extension = ".caption"\n')
    dog, cat = load_dataset_config(toml)
    assert dog.images.folder == str(tmp_path / "dog") and dog.images.repeats == 4 and dog.loss_weight == 2.0
    assert dog.classes.folders[0].folder == str(tmp_path / "class_dog") and dog.classes.prior_loss_weight == 0.5
    assert cat.classes is None and cat.images.caption_extension == ".caption" and cat.images.repeats == 1
    examples = subset_examples([dog, cat])
    assert [(e.prompt, e.loss_weight, e.subset) for e in examples] == [("sks dog", 2.0, 0), ("sks cat", 1.0, 1),
                                                                       ("sks cat", 1.0, 1)]


@pytest.mark.parametrize("text, message", [
    ("", "no subsets"),
    ("subsets = []\n", "no subsets"),
    ('name = "x"\n[[subsets]]\nfolder = "d"\n', "unknown setting(s) name"),
    ('[[subsets]]\nfolder = "d"\nrepeat = 3\n', "subset 1: unknown key(s) repeat"),
    ('[[subsets]]\nprompt = "x"\n', "'folder' is required"),
    ('[[subsets]]\nfolder = "d"\nrepeats = 0\n', "repeats must be >= 1"),
    ('[[subsets]]\nfolder = "d"\nrepeats = "3"\n', "repeats must be int"),
    ('[[subsets]]\nfolder = "d"\nclass_folder = "c"\n', "class_folder and class_prompt go together"),
    ('[[subsets]]\nfolder = "d"\nprior_loss_weight = 2.0\n', "class_folder is not"),
    ('[[subsets]]\nfolder = "d"\nloss_weight = 0\n', "loss_weight must be > 0"),
    ("[[subsets]\n", "not valid TOML"),
])
def test_bad_dataset_config_is_one_clear_error(tmp_path, text, message):
    toml = tmp_path / "data.toml"
    toml.write_text(text)
    with pytest.raises(UserError) as err:
        load_dataset_config(toml)
    assert message in str(err.value) and str(toml) in str(err.value)


def test_empty_subset_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    toml = tmp_path / "data.toml"
    toml.write_text('[[subsets]]\nfolder = "empty"\nprompt = "x"\n')
    with pytest.raises(UserError, match="empty"):
        subset_examples(load_dataset_config(toml))


@pytest.mark.parametrize("flags, named", [({"instance_data_dir": "x"}, "--instance_data_dir"),
                                          ({"instance_prompt": "x"}, "--instance_prompt"),
                                          ({"with_prior_preservation": True}, "--with_prior_preservation"),
                                          ({"repeats": 2}, "--repeats")])
def test_dataset_config_conflicts_with_the_folder_flags(flags, named):
    with pytest.raises(UserError, match=named):
        TrainConfig(dataset_config="data.toml", **flags)


def test_one_folder_from_the_flags_is_one_subset(tmp_path):
    images(tmp_path, "a")
    config = TrainConfig(instance_data_dir=str(tmp_path), instance_prompt="sks", repeats=3)
    (subset,) = resolve_subsets(config)
    assert (subset.images.folder, subset.images.prompt, subset.images.repeats, subset.classes) == \
        (str(tmp_path), "sks", 3, None)


def test_per_subset_repeats_set_how_often_each_image_is_drawn(tmp_path):
    from flatlora_diffusion.data.examples import Example

    examples = [Example(tmp_path / "a", "a", (64, 64), repeats=1), Example(tmp_path / "b", "b", (64, 96), repeats=3)]
    assert sorted(repeated_indices(examples)) == [0, 1, 1, 1]
    plain = [Example(tmp_path / str(k), "p", (64, 64)) for k in range(3)]
    assert repeated_indices(plain, 2) == [0, 1, 2, 0, 1, 2]  # equal repeats: the order single-folder runs had
    square = SquareStream(examples, seed=0, resolution=64)
    epoch = [d.index for d in square.draw(0, 4)]
    assert square.samples_per_epoch(1) == 4 and Counter(epoch) == {0: 1, 1: 3}
    buckets = BucketStream(examples, seed=0, resolution=64)
    drawn = Counter(d.index for k in range(buckets._batches_per_epoch(1)) for d in buckets.draw(k, 1))
    assert drawn == {0: 1, 1: 3}


@pytest.mark.parametrize("flags, message", [({"caption_dropout_rate": 1.0}, "--caption_dropout_rate"),
                                            ({"caption_dropout_rate": -0.1}, "--caption_dropout_rate"),
                                            ({"keep_tokens": 2}, "--keep_tokens only applies with --shuffle_caption"),
                                            ({"keep_tokens": -1, "shuffle_caption": True}, "--keep_tokens must be"),
                                            ({"instance_data_dir": None}, "--instance_data_dir (or --dataset_config)")])
def test_caption_and_folder_flags_are_checked(flags, message):
    with pytest.raises(UserError) as err:
        TrainConfig(**{"instance_data_dir": "x", "instance_prompt": "sks", **flags})
    assert message in str(err.value)
