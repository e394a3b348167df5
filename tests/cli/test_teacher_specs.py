"""How `--teacher` specs resolve (kdfast.teachers): the way users type them, with errors that say what was tried.

`name:fn` finds `name.py` in the current directory, `./dir/file.py:fn` and `dir/file.py`
(the default function `teacher`) load that file, an importable module still works, and a
missing file, module or function names what was looked for. `parse_device` rejects
devices this torch or machine cannot provide; a missing `transformers` is reported with
the install line that matches how kdfast was installed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from kdfast import teachers
from kdfast.contract.install import install_hint
from kdfast.teachers import DEFAULT_FUNCTION, TeacherError, is_function_spec, load_teacher, parse_device

TEACHER_SOURCE = "import torch\n\ndef teacher(ids):\n    return torch.zeros(*ids.shape, 5)\n\n" \
                 "def doubled(ids):\n    return torch.ones(*ids.shape, 7)\n"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory holding my_teacher.py and models/other.py; it is the current directory."""
    (tmp_path / "my_teacher.py").write_text(TEACHER_SOURCE)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "other.py").write_text(TEACHER_SOURCE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("spec, file, function, width", [
    ("my_teacher:teacher", "my_teacher.py", "teacher", 5),
    ("my_teacher:doubled", "my_teacher.py", "doubled", 7),
    ("my_teacher.py", "my_teacher.py", DEFAULT_FUNCTION, 5),
    ("./my_teacher.py:doubled", "my_teacher.py", "doubled", 7),
    ("models/other.py", os.path.join("models", "other.py"), DEFAULT_FUNCTION, 5),
    ("./models/other.py:doubled", os.path.join("models", "other.py"), "doubled", 7),
    ("models.other:doubled", os.path.join("models", "other.py"), "doubled", 7),
])
def test_local_teacher_specs_resolve_from_the_current_directory(project, spec, file, function, width):
    assert is_function_spec(spec)
    teacher = load_teacher(spec)
    assert teacher.name == f"{project / file}:{function}"  # absolute: the manifest does not depend on the cwd
    logits = teacher(torch.zeros(2, 3, dtype=torch.int64))
    assert logits.shape == (2, 3, width)


def test_importable_module_spec_still_works(project, monkeypatch):
    package = project / "site"
    package.mkdir()
    (package / "installed_teacher_module.py").write_text(TEACHER_SOURCE)
    monkeypatch.syspath_prepend(str(package))
    teacher = load_teacher("installed_teacher_module:doubled")
    assert teacher.name == "installed_teacher_module:doubled"
    assert teacher(torch.zeros(1, 2, dtype=torch.int64)).shape == (1, 2, 7)
    sys.modules.pop("installed_teacher_module", None)


@pytest.mark.parametrize("spec, fragments", [
    ("absent_module:teacher", ["teacher module 'absent_module' not found", "absent_module.py", "Python path"]),
    ("./nowhere/teacher.py:teacher", ["teacher file ./nowhere/teacher.py not found", "nowhere"]),
    ("nowhere.py", ["teacher file nowhere.py not found"]),
    ("my_teacher:missing", ["has no function 'missing'", "functions defined there: doubled, teacher"]),
    ("models/other.py:teacher.attribute", ["has no function 'teacher.attribute'"]),
])
def test_teacher_spec_errors_say_what_was_tried(project, spec, fragments):
    with pytest.raises(TeacherError) as error:
        load_teacher(spec)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_a_file_without_the_default_function_names_the_convention(project):
    (project / "plain.py").write_text("def logits(ids):\n    return ids\n")
    with pytest.raises(TeacherError) as error:
        load_teacher("plain.py")
    message = str(error.value)
    assert f"has no function {DEFAULT_FUNCTION!r} (the default when no :FUNCTION is given)" in message
    assert "plain.py:FUNCTION" in message and "functions defined there: logits" in message


@pytest.mark.parametrize("spec, expected", [
    ("gpt2", False), ("Qwen/Qwen2.5-0.5B", False), ("teacher.py", True), ("pkg.module:build", True),
    ("dir/teacher.py:fn", True),
])
def test_is_function_spec(spec, expected):
    assert is_function_spec(spec) is expected


@pytest.mark.parametrize("name, fragment", [
    ("gpu", "unknown device 'gpu'"),
    ("CPU", "unknown device 'CPU'"),
    ("meta", "cannot run on device 'meta'"),
    ("cuda:99", "device 'cuda:99'"),
])
def test_parse_device_rejects_what_cannot_run(name, fragment):
    with pytest.raises(TeacherError) as error:
        parse_device(name)
    assert fragment in str(error.value)


def test_parse_device_accepts_the_cpu():
    assert parse_device("cpu") == torch.device("cpu")


def test_missing_transformers_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(ImportError) as error:
        teachers.load_tokenizer("gpt2")
    assert install_hint("compress", ["transformers"]) in str(error.value)
