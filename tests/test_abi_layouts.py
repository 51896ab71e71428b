"""The construct layouts must equal Xen's own headers, field by field, for every arch.

The oracle is Debian's libxen-dev: ``xen/foreign/<arch>.h`` declares ``struct
shared_info_<arch>`` and friends with explicit packing, so all four ABIs compile here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xreplay.abi import ARCHES, layout, nr_ports, port_to_word_bit, word_bit_to_port

FOREIGN = Path("/usr/include/xen/foreign")

pytestmark = pytest.mark.skipif(
    not (FOREIGN / "x86_64.h").exists() or shutil.which("gcc") is None,
    reason="needs gcc and Debian's libxen-dev (make deps installs them)")


def c_offsets(arch: str, tmp_path: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """Compile and run a probe that prints offsetof/sizeof of every field we declare."""
    structs = layout(arch)
    lines = []
    for sname in structs.STRUCT_NAMES:
        cty = f"struct {sname}_{arch}"
        lines.append(f'printf("%s - %zu %zu\\n", "{sname}", (size_t)0, sizeof({cty}));')
        for field in structs.fields(sname):
            lines.append(
                f'printf("%s %s %zu %zu\\n", "{sname}", "{field}", offsetof({cty}, {field}), '
                f"sizeof((({cty} *)0)->{field}));")
    src = tmp_path / f"probe_{arch}.c"
    src.write_text(
        "#include <stdint.h>\n#include <stddef.h>\n#include <stdio.h>\n"
        f'#include <xen/foreign/{arch}.h>\nint main(void) {{\n' + "\n".join(lines)
        + "\nreturn 0;\n}\n")
    exe = tmp_path / f"probe_{arch}"
    # arch-x86/xen.h defines XEN_HAVE_PV_UPCALL_MASK; the generated foreign headers test it
    # unsuffixed, so define it the way an x86 build of Xen's headers would.
    defines = ["-DXEN_HAVE_PV_UPCALL_MASK=1"] if structs.spec.has_upcall_mask else []
    subprocess.run(["gcc", "-D__XEN_INTERFACE_VERSION__=0x00040d00", *defines, "-o", str(exe),
                    str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        sname, field, off, size = line.split()
        table[(sname, field)] = (int(off), int(size))
    return table


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_layout_matches_xen_foreign_header(arch: str, tmp_path: Path) -> None:
    structs = layout(arch)
    oracle = c_offsets(arch, tmp_path)
    for sname in structs.STRUCT_NAMES:
        assert structs.struct(sname).sizeof() == oracle[(sname, "-")][1], sname
        for field, (off, size) in structs.fields(sname).items():
            assert (off, size) == oracle[(sname, field)], f"{arch} {sname}.{field}"


def test_known_sizes() -> None:
    # Figures from the reference (compiled from Xen 4.11 and HEAD public headers).
    assert layout("x86_64").shared_info.sizeof() == 3136
    assert layout("x86_32").shared_info.sizeof() == 2344
    assert layout("arm64").shared_info.sizeof() == 1088
    assert layout("arm32").vcpu_info.sizeof() == 48
    assert layout("x86_32").fields("vcpu_info")["evtchn_pending_sel"] == (4, 4)


@pytest.mark.parametrize("arch,bpw,ports", [("x86_64", 64, 4096), ("x86_32", 32, 1024),
                                            ("arm64", 64, 4096), ("arm32", 64, 4096)])
def test_port_math(arch: str, bpw: int, ports: int) -> None:
    structs = layout(arch)
    assert structs.bits_per_word == bpw
    assert structs.nr_ports == nr_ports(bpw) == ports
    assert port_to_word_bit(0, bpw) == (0, 0)
    assert port_to_word_bit(ports - 1, bpw) == (bpw - 1, bpw - 1)
    assert port_to_word_bit(bpw + 3, bpw) == (1, 3)
    for port in (0, 1, bpw - 1, bpw, ports - 1):
        assert word_bit_to_port(*port_to_word_bit(port, bpw), bpw) == port
    with pytest.raises(ValueError):
        port_to_word_bit(ports, bpw)
