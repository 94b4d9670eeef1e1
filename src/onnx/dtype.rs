//! Element types of `TensorProto.data_type` and their storage sizes.

/// `TensorProto.DataType` values used by name in this crate.
pub mod code {
    #![allow(missing_docs)]
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const STRING: i32 = 8;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const BFLOAT16: i32 = 16;
}

/// Bits per element for `data_type`, or `None` for strings, undefined and
/// codes this crate does not know (whose size therefore cannot be checked).
pub fn bits(data_type: i32) -> Option<u64> {
    Some(match data_type {
        1 | 6 | 12 => 32,       // float, int32, uint32
        2 | 3 | 9 => 8,         // uint8, int8, bool
        4 | 5 | 10 | 16 => 16,  // uint16, int16, float16, bfloat16
        7 | 11 | 13 | 14 => 64, // int64, double, uint64, complex64
        15 => 128,              // complex128
        17..=20 | 24 => 8,      // float8 variants, float8e8m0
        21..=23 => 4,           // uint4, int4, float4e2m1
        25 | 26 => 2,           // uint2, int2
        _ => return None,
    })
}

/// Bytes that `elements` values of `data_type` occupy in `raw_data`
/// (sub-byte types are packed), or `None` when unknown or overflowing.
pub fn raw_len(data_type: i32, elements: u64) -> Option<u64> {
    let bits = bits(data_type)?;
    elements.checked_mul(bits).map(|b| b.div_ceil(8))
}

/// Human-readable name of an element type, for error messages.
pub fn name(data_type: i32) -> String {
    let known = match data_type {
        0 => "undefined",
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "float64",
        12 => "uint32",
        13 => "uint64",
        14 => "complex64",
        15 => "complex128",
        16 => "bfloat16",
        17 => "float8e4m3fn",
        18 => "float8e4m3fnuz",
        19 => "float8e5m2",
        20 => "float8e5m2fnuz",
        21 => "uint4",
        22 => "int4",
        23 => "float4e2m1",
        24 => "float8e8m0",
        25 => "uint2",
        26 => "int2",
        _ => return format!("data type {data_type}"),
    };
    known.to_string()
}

/// Whether `data_type` is an integer type (including bool, whose values
/// read as 0 and 1).
pub fn is_integer(data_type: i32) -> bool {
    matches!(data_type, 2..=7 | 9 | 12 | 13)
}

/// Whether `data_type` is a floating-point type of the kinds weights use.
pub fn is_float(data_type: i32) -> bool {
    matches!(data_type, 1 | 10 | 11 | 16..=20 | 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_types_round_up() {
        assert_eq!(raw_len(22, 3), Some(2));
        assert_eq!(raw_len(1, 3), Some(12));
        assert_eq!(raw_len(25, 5), Some(2));
        assert_eq!(raw_len(8, 3), None);
        assert_eq!(raw_len(11, u64::MAX), None);
    }
}
