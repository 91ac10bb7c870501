//! The checks on network card values that the VMM and `splitvisor-net` must agree on: what is a
//! usable MAC and what is a usable MTU. Both call these, so the rule and its messages exist
//! once, tested against the table of cases in `testdata/device-values.txt` (which the
//! end-to-end tests also run against the command lines).

/// Smallest MTU IPv4 allows (RFC 791).
pub const MIN_MTU: u16 = 68;

/// A MAC a network card can have: six hex bytes separated by ':', unicast, not all zero.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let shape =
        || format!("'{text}' is not a MAC address: expected six hex bytes like 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(shape)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(shape());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| shape())?;
    }
    if parts.next().is_some() {
        return Err(shape());
    }
    if mac[0] & 1 == 1 {
        return Err(format!(
            "'{text}' is a multicast address: a network card needs a unicast MAC (even first \
             byte), like 52:54:00:12:34:56"
        ));
    }
    if mac == [0; 6] {
        return Err(format!(
            "'{text}' is the all-zero address: a network card needs a unicast MAC like \
             52:54:00:12:34:56"
        ));
    }
    Ok(mac)
}

/// An MTU to advertise: a whole number of bytes from 68 (IPv4's minimum) to 65535.
pub fn parse_mtu(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(mtu) if mtu >= MIN_MTU && text.bytes().all(|b| b.is_ascii_digit()) => Ok(mtu),
        _ => Err(format!(
            "'{text}' is not an MTU: expected a number of bytes from {MIN_MTU} to 65535"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of cases.
    const CASES: &str = include_str!("../testdata/device-values.txt");

    #[test]
    fn macs_and_mtus_are_checked_as_the_shared_table_says() {
        let mut checked = 0;
        for line in CASES
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let fields: Vec<&str> = line.split('\t').collect();
            let [kind, input, expected] = fields[..] else {
                panic!("malformed line {line:?}");
            };
            let result = match kind {
                "mac" => parse_mac(input).map(|_| ()),
                "mtu" => parse_mtu(input).map(|_| ()),
                other => panic!("unknown kind {other} in {line:?}"),
            };
            match result {
                Ok(()) => assert_eq!(expected, "ok", "{line:?}"),
                Err(message) => assert_eq!(message, expected, "{line:?}"),
            }
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} cases");
    }

    #[test]
    fn a_mac_parses_to_its_bytes() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:ef"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        assert_eq!(parse_mtu("1500"), Ok(1500));
    }
}
