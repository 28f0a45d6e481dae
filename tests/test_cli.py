from moecompress.cli import main


def test_wrong_model_path_is_a_clear_error(capsys, tmp_path):
    assert main(["compress", str(tmp_path / "missing-model"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_folder_without_config_is_a_clear_error(capsys, tmp_path):
    assert main(["eval", "ppl", str(tmp_path), "--data", "x.txt"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_unknown_recipe_key_is_a_clear_error(capsys, tmp_path, tiny_text_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantization:\n  group: 64\n")
    assert main(["compress", str(tiny_text_path), "--recipe", str(recipe), "-o", str(tmp_path / "o")]) == 2
    assert "Did you mean 'group_size'" in capsys.readouterr().err
