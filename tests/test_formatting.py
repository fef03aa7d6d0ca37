"""--format: the Go-template subset vmrt understands, and what it refuses."""

from __future__ import annotations

import pytest

from vmrt import formatting
from vmrt.errors import UsageError

DOC = {"Id": "sha256:ab", "RepoTags": ["a:1", "b:2"], "Config": {"Cmd": ["sh"], "Env": None},
       "Size": 5, "Ok": True}


@pytest.mark.parametrize("template,out", [
    ("{{.Id}}", "sha256:ab"),
    ("{{ .Config.Cmd }}", "[sh]"),
    ("{{json .Config}}", '{"Cmd":["sh"],"Env":null}'),
    ("{{json .}}", '{"Id":"sha256:ab","RepoTags":["a:1","b:2"],"Config":{"Cmd":["sh"],"Env":null},'
                   '"Size":5,"Ok":true}'),
    ("{{.RepoTags}}\\t{{.Size}} {{.Ok}} {{.Config.Env}}", "[a:1 b:2]\t5 true <no value>"),
])
def test_render(template: str, out: str) -> None:
    assert formatting.render(template, DOC) == out


@pytest.mark.parametrize("template,message", [
    ("{{.Nope}}", "no field 'Nope'"),
    ("{{.Id.More}}", "no field 'More'"),
    ("{{range .RepoTags}}{{.}}{{end}}", "unsupported action"),
    ("{{index .RepoTags 0}}", "unsupported action"),
])
def test_unsupported_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        formatting.render(template, DOC)


def test_table_and_json_output() -> None:
    rows = [{"Repository": "busybox", "Tag": "latest"}, {"Repository": "localhost/long-name", "Tag": "1"}]
    cols = [("REPOSITORY", "Repository", 0), ("TAG", "Tag", 0)]
    assert formatting.emit(None, rows, cols) == ["REPOSITORY            TAG",
                                                 "busybox               latest",
                                                 "localhost/long-name   1"]
    assert formatting.emit("json", rows[:1], cols) == ['{"Repository":"busybox","Tag":"latest"}']
    assert formatting.emit("table {{.Repository}}:{{.Tag}}", rows[:1], cols) == ["REPOSITORY:TAG", "busybox:latest"]
