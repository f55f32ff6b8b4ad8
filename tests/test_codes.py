"""The protocol's codes are defined once (raafd/protocol/codes.py), and the errors, the client
and the wire contract in docs/protocol.md agree with them."""

from __future__ import annotations

import re
from pathlib import Path

from raafd import errors
from raafd.client import client
from raafd.protocol.codes import SUBPROTOCOL, CloseCode, ErrorCode

PROTOCOL_DOC = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()


def _error_classes() -> list[type[errors.RaafdError]]:
    found = [errors.RaafdError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return [cls for cls in found if cls.__module__ == "raafd.errors"]


def test_every_error_class_has_a_code_of_the_protocol() -> None:
    classes = _error_classes()
    assert len(classes) > 10
    for cls in classes:
        assert isinstance(cls.code, ErrorCode), cls


def test_every_error_code_is_in_the_protocol_doc() -> None:
    for code in ErrorCode:
        assert f"`{code.value}`" in PROTOCOL_DOC, code


def test_every_close_code_is_in_the_protocol_doc_and_the_doc_has_no_other() -> None:
    documented = {int(n) for n in re.findall(r"^\| (\d{4}) \|", PROTOCOL_DOC, re.MULTILINE)}
    assert documented == {int(code) for code in CloseCode}


def test_the_subprotocol_is_the_documented_one_and_the_clients() -> None:
    assert f"subprotocol `{SUBPROTOCOL}`" in PROTOCOL_DOC
    assert client.SUBPROTOCOL is SUBPROTOCOL


def test_the_client_gives_up_on_the_refusal_close_codes_only() -> None:
    assert client.FATAL_CLOSE_CODES == {
        CloseCode.UNAUTHORIZED: "unauthorized",
        CloseCode.FORBIDDEN: "forbidden",
    }
