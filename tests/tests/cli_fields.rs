//! `l0-vmm fields [--json]`: the VMCS field catalogue L0 emulates.
//!
//! Encodings are checked against the structure the SDM gives them
//! (Vol. 3D, Appendix B / Vol. 3C 25.11.2: bit 0 access type, bits 9:1
//! index, bits 11:10 type, bits 14:13 width) and against a few encodings
//! copied from Appendix B, not only against `vmcs12` itself.

use nested_tests::cli;
use vmcs12::VmcsField;

/// A few encodings from SDM Vol. 3D Appendix B.
const SDM_ENCODINGS: &[(&str, u64)] = &[
    ("VIRTUAL_PROCESSOR_ID", 0x0000),
    ("GUEST_ES_SELECTOR", 0x0800),
    ("HOST_CS_SELECTOR", 0x0c02),
    ("IO_BITMAP_A", 0x2000),
    ("MSR_BITMAP", 0x2004),
    ("EPT_POINTER", 0x201a),
    ("GUEST_PHYSICAL_ADDRESS", 0x2400),
    ("VMCS_LINK_POINTER", 0x2800),
    ("PIN_BASED_VM_EXEC_CONTROL", 0x4000),
    ("CPU_BASED_VM_EXEC_CONTROL", 0x4002),
    ("EXCEPTION_BITMAP", 0x4004),
    ("VM_INSTRUCTION_ERROR", 0x4400),
    ("VM_EXIT_REASON", 0x4402),
    ("VM_EXIT_INSTRUCTION_LEN", 0x440c),
    ("GUEST_INTERRUPTIBILITY_INFO", 0x4824),
    ("EXIT_QUALIFICATION", 0x6400),
    ("GUEST_CR0", 0x6800),
    ("GUEST_RIP", 0x681e),
    ("GUEST_RFLAGS", 0x6820),
    ("HOST_CR3", 0x6c02),
    ("HOST_RIP", 0x6c16),
];

/// The JSON the CLI printed: everything the sink received, joined.
fn cli_json() -> serde_json::Value {
    let (code, lines) = cli(&["fields", "--json"]);
    assert_eq!(code, 0);
    let text = lines.join("\n");
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "`l0-vmm fields --json` output (through the sink) is not JSON ({e}); \
             main_with_args must print the catalogue through its sink:\n{text}"
        )
    })
}

fn width_of_encoding(enc: u64) -> &'static str {
    match (enc >> 13) & 3 {
        0 => "16",
        1 => "64",
        2 => "32",
        _ => "natural",
    }
}

fn kind_of_encoding(enc: u64) -> &'static str {
    match (enc >> 10) & 3 {
        0 => "control",
        1 => "exit-info",
        2 => "guest",
        _ => "host",
    }
}

fn check_catalogue(v: &serde_json::Value) {
    let fields = v.as_array().expect("a JSON array");
    assert!(fields.len() >= 170, "only {} fields", fields.len());
    assert_eq!(fields.len(), VmcsField::ALL.len());
    let mut seen = std::collections::HashSet::new();
    for f in fields {
        let name = f["name"].as_str().expect("name");
        let enc_text = f["encoding"].as_str().expect("encoding string");
        let enc = u64::from_str_radix(enc_text.trim_start_matches("0x"), 16).expect("hex");
        assert!(seen.insert(enc), "encoding {enc:#x} listed twice");
        // Same encoding as the vmcs12 model L0 uses.
        let model = VmcsField::ALL
            .iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("{name} is not a vmcs12 field"));
        assert_eq!(u64::from(model.encoding()), enc, "{name}");
        // The encoding's own structure agrees with the other columns.
        assert_eq!(enc & !0x6fff, 0, "{name}: bits 31:15 and 12 are reserved");
        assert_eq!(f["width"], width_of_encoding(enc), "{name}");
        assert_eq!(f["kind"], kind_of_encoding(enc), "{name}");
        // Read-only = the VM-exit information type (bits 11:10 = 1).
        assert_eq!(
            f["read_only"],
            kind_of_encoding(enc) == "exit-info",
            "{name}"
        );
        assert!(
            f["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{name}"
        );
    }
    for &(name, enc) in SDM_ENCODINGS {
        let f = fields
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(f["encoding"], format!("{enc:#06x}"), "{name}");
    }
}

/// The catalogue function the CLI prints.
#[test]
fn test_fields_json_catalogue_matches_sdm_and_vmcs12() {
    let v: serde_json::Value =
        serde_json::from_str(&l0_vmm::cli::fields_json()).expect("fields_json is JSON");
    check_catalogue(&v);
}

/// `l0-vmm fields --json` through the CLI entry point.
#[test]
fn test_fields_json_via_main_with_args() {
    check_catalogue(&cli_json());
}

/// `l0-vmm fields`: a header and one line per field with its encoding.
#[test]
fn test_fields_table_via_main_with_args() {
    let (code, lines) = cli(&["fields"]);
    assert_eq!(code, 0);
    assert_eq!(lines.len(), VmcsField::ALL.len() + 1, "{lines:?}");
    for &(name, enc) in SDM_ENCODINGS {
        let row = lines
            .iter()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("{name} missing from the table"));
        assert!(row.starts_with(&format!("{enc:#06x}")), "{row}");
    }
}
