"""The local certificate authority and the TLS settings: what `seal certs` writes, and what a
service refuses to start with."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from seal.cli import main
from seal.config import ServiceConfig, load_config
from seal.tls import LOCAL_SERVICES, TlsFiles, make_local_pki, tls_env, tls_files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    return make_local_pki(tmp_path_factory.mktemp("pki"), hosts=("localhost", "127.0.0.1", "gpu-host-1"))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _config(tls: TlsFiles | None = None, **overrides: str) -> ServiceConfig:
    paths = {"tls_ca": str(tls.ca), "tls_cert": str(tls.cert), "tls_key": str(tls.key)} if tls else {}
    return ServiceConfig(kind="teacher", **{**paths, **overrides})


def test_every_service_certificate_is_signed_by_the_ca_and_names_its_service(
    pki: dict[str, TlsFiles],
) -> None:
    assert set(pki) == set(LOCAL_SERVICES)
    ca = _cert(pki["teacher"].ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name, tls in pki.items():
        cert = _cert(tls.cert)
        cert.verify_directly_issued_by(ca)  # raises unless the CA's key signed exactly this certificate
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
        key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
        assert key.public_key() == cert.public_key()


def test_certificates_cover_the_service_name_and_every_host(pki: dict[str, TlsFiles]) -> None:
    sans = _cert(pki["student"].cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"student", "localhost", "gpu-host-1"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_private_keys_are_readable_by_their_owner_only(pki: dict[str, TlsFiles]) -> None:
    directory = pki["teacher"].ca.parent
    keys = sorted(directory.glob("*.key"))
    assert [k.stem for k in keys] == sorted(["ca", *LOCAL_SERVICES])
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key.name
    assert not list(directory.glob(".*.tmp"))  # no staging file left behind


def test_running_again_keeps_every_existing_file(tmp_path: Path) -> None:
    make_local_pki(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    make_local_pki(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_new_host_reissues_the_certificates_for_the_same_keys_and_ca(tmp_path: Path) -> None:
    first = make_local_pki(tmp_path, services=("gateway",))
    ca_pem, key_pem = first["gateway"].ca.read_bytes(), first["gateway"].key.read_bytes()
    again = make_local_pki(tmp_path, services=("gateway",), hosts=("localhost", "127.0.0.1", "10.0.0.7"))
    sans = _cert(again["gateway"].cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.7") in sans.get_values_for_type(x509.IPAddress)
    assert again["gateway"].ca.read_bytes() == ca_pem and again["gateway"].key.read_bytes() == key_pem


def test_a_certificate_from_another_ca_is_reissued(tmp_path: Path) -> None:
    make_local_pki(tmp_path / "a", services=("auditor",))
    other = make_local_pki(tmp_path / "b", services=("auditor",))
    (tmp_path / "a" / "auditor.pem").write_bytes(other["auditor"].cert.read_bytes())
    fixed = make_local_pki(tmp_path / "a", services=("auditor",))
    _cert(fixed["auditor"].cert).verify_directly_issued_by(_cert(tmp_path / "a" / "ca.pem"))


def test_a_ca_certificate_that_does_not_match_its_key_is_refused(tmp_path: Path) -> None:
    make_local_pki(tmp_path / "a", services=())
    make_local_pki(tmp_path / "b", services=())
    (tmp_path / "a" / "ca.pem").write_bytes((tmp_path / "b" / "ca.pem").read_bytes())
    with pytest.raises(ValueError, match="does not belong to the CA key"):
        make_local_pki(tmp_path / "a", services=("teacher",))


def test_no_tls_settings_means_plaintext() -> None:
    assert tls_files(_config()) is None


def test_a_full_set_of_tls_settings_is_loaded(pki: dict[str, TlsFiles]) -> None:
    assert tls_files(_config(pki["teacher"])) == pki["teacher"]


@pytest.mark.parametrize("missing", ["tls_ca", "tls_cert", "tls_key"])
def test_a_partial_set_of_tls_settings_is_refused_naming_what_is_missing(
    pki: dict[str, TlsFiles], missing: str
) -> None:
    with pytest.raises(ValueError, match=f"missing --{missing.replace('_', '-')}"):
        tls_files(_config(pki["teacher"], **{missing: ""}))


def test_an_unreadable_file_is_refused_naming_the_setting(pki: dict[str, TlsFiles], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert: cannot read .*nope.pem"):
        tls_files(_config(pki["teacher"], tls_cert=str(tmp_path / "nope.pem")))
    if os.geteuid() != 0:  # root reads a 0000 file anyway
        locked = tmp_path / "locked.key"
        locked.write_bytes(pki["teacher"].key.read_bytes())
        locked.chmod(0)
        with pytest.raises(ValueError, match="tls_key: cannot read"):
            tls_files(_config(pki["teacher"], tls_key=str(locked)))


def test_files_that_are_not_pem_are_refused(pki: dict[str, TlsFiles]) -> None:
    # A key given where the CA belongs, and a certificate where the key belongs: both named.
    with pytest.raises(ValueError, match="tls_ca: .* is not a PEM certificate"):
        tls_files(_config(pki["teacher"], tls_ca=str(pki["teacher"].key)))
    with pytest.raises(ValueError, match="tls_key: .* is not an unencrypted PEM private key"):
        tls_files(_config(pki["teacher"], tls_key=str(pki["teacher"].cert)))


def test_a_key_that_does_not_belong_to_the_certificate_is_refused(pki: dict[str, TlsFiles]) -> None:
    with pytest.raises(ValueError, match="tls_key: .*student.key is not the key of the certificate"):
        tls_files(_config(pki["teacher"], tls_key=str(pki["student"].key)))


def test_tls_env_round_trips_through_the_service_config(pki: dict[str, TlsFiles]) -> None:
    config = load_config("auditor", env=tls_env(pki["auditor"]))
    assert tls_files(config) == pki["auditor"]


def test_seal_certs_writes_a_set_and_prints_the_settings_per_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--hosts", "localhost,127.0.0.1,10.1.2.3"]) == 0
    printed = capsys.readouterr().out
    for name in LOCAL_SERVICES:
        assert f"SEAL_TLS_CERT={out.resolve() / name}.pem" in printed
        assert f"SEAL_TLS_KEY={out.resolve() / name}.key" in printed
    assert printed.count(f"SEAL_TLS_CA={out.resolve() / 'ca.pem'}") == len(LOCAL_SERVICES)
    sans = _cert(out / "gateway.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in sans.get_values_for_type(x509.IPAddress)


def test_seal_certs_refuses_an_empty_host_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["certs", "--out", str(tmp_path), "--hosts", " , "])
    assert exit_.value.code == 2
    assert "--hosts needs at least one host" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_client_command_with_part_of_the_tls_flags_stops_before_dialling(
    pki: dict[str, TlsFiles], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("SEAL_TLS_CA", "SEAL_TLS_CERT", "SEAL_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SEAL_TLS_CERT", str(pki["client"].cert))  # the environment fills in flags
    with pytest.raises(SystemExit) as exit_:
        main(["status", "job-1", "--gateway", "127.0.0.1:1", "--tls-ca", str(pki["client"].ca)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "missing --tls-key" in err and "--tls-cert" not in err.split("missing")[1]


def test_local_stack_credentials_are_used_only_for_the_local_stacks_gateway(
    tmp_path: Path, monkeypatch
) -> None:
    """`seal submit/status` find .seal/'s token and client certificate for `seal up`'s gateway, and
    never send them to another gateway given with --gateway."""
    from argparse import Namespace

    from seal.cli import DEFAULT_GATEWAY, _client_tls, _token

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEAL_API_TOKEN", raising=False)
    for name in ("SEAL_TLS_CA", "SEAL_TLS_CERT", "SEAL_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    make_local_pki(tmp_path / ".seal" / "tls")
    (tmp_path / ".seal" / "gateway").mkdir(parents=True)
    (tmp_path / ".seal" / "gateway" / "operator-token").write_text("seal_local\n")

    def args(gateway: str) -> Namespace:
        return Namespace(gateway=gateway, token="", tls_ca="", tls_cert="", tls_key="")

    local = _client_tls(args(DEFAULT_GATEWAY))
    assert local is not None and Path(local.cert).name == "client.pem"
    assert _token(args(DEFAULT_GATEWAY)) == "seal_local"
    assert _client_tls(args("elsewhere:50051")) is None
    assert _token(args("elsewhere:50051")) == ""
