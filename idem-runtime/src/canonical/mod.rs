//! Canonical JSON, written straight from `Serialize` into any `io::Write` (a hasher).
//!
//! Canonical means: object members (of structs and maps alike) sorted by the UTF-8 bytes of
//! their keys, no whitespace, scalars and strings exactly as serde_json writes them, non-string
//! map keys as serde_json turns them into strings. Sequences are streamed as they come; only an
//! object's members are buffered, to sort them. This replaces building a `serde_json::Value`
//! tree, which allocated for every string and node on the fingerprint of every call.

use std::io::Write;

use serde::ser::{self, Impossible, Serialize};
use serde_json::Error;

/// Writes the canonical JSON of `value` to `out`.
pub(crate) fn write<T: Serialize + ?Sized, W: Write>(value: &T, out: &mut W) -> Result<(), Error> {
    value.serialize(Canonical { out })
}

fn io(e: std::io::Error) -> Error {
    Error::io(e)
}

/// Writes a scalar or string with serde_json's own formatting and escaping.
fn plain<T: Serialize + ?Sized, W: Write>(out: &mut W, v: &T) -> Result<(), Error> {
    serde_json::to_writer(out, v)
}

struct Canonical<'a, W> {
    out: &'a mut W,
}

impl<'a, W: Write> ser::Serializer for Canonical<'a, W> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Seq<'a, W>;
    type SerializeTuple = Seq<'a, W>;
    type SerializeTupleStruct = Seq<'a, W>;
    type SerializeTupleVariant = Seq<'a, W>;
    type SerializeMap = Object<'a, W>;
    type SerializeStruct = Object<'a, W>;
    type SerializeStructVariant = Object<'a, W>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_i128(self, v: i128) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_u128(self, v: u128) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        plain(self.out, &v)
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        plain(self.out, v)
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        plain(self.out, v)
    }
    fn serialize_none(self) -> Result<(), Error> {
        self.out.write_all(b"null").map_err(io)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.serialize_none()
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), Error> {
        self.serialize_none()
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), Error> {
        plain(self.out, variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.out.write_all(b"{").map_err(io)?;
        plain(self.out, variant)?;
        self.out.write_all(b":").map_err(io)?;
        value.serialize(Canonical {
            out: &mut *self.out,
        })?;
        self.out.write_all(b"}").map_err(io)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Seq<'a, W>, Error> {
        self.out.write_all(b"[").map_err(io)?;
        Ok(Seq {
            out: self.out,
            first: true,
            close: b"]",
        })
    }
    fn serialize_tuple(self, len: usize) -> Result<Seq<'a, W>, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Seq<'a, W>, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Seq<'a, W>, Error> {
        self.out.write_all(b"{").map_err(io)?;
        plain(self.out, variant)?;
        self.out.write_all(b":[").map_err(io)?;
        Ok(Seq {
            out: self.out,
            first: true,
            close: b"]}",
        })
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Object<'a, W>, Error> {
        Ok(Object::new(self.out, len.unwrap_or(0), None))
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Object<'a, W>, Error> {
        Ok(Object::new(self.out, len, None))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Object<'a, W>, Error> {
        Ok(Object::new(self.out, len, Some(variant)))
    }
}

struct Seq<'a, W> {
    out: &'a mut W,
    first: bool,
    close: &'static [u8],
}

impl<W: Write> Seq<'_, W> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        if !self.first {
            self.out.write_all(b",").map_err(io)?;
        }
        self.first = false;
        value.serialize(Canonical {
            out: &mut *self.out,
        })
    }
    fn close(self) -> Result<(), Error> {
        self.out.write_all(self.close).map_err(io)
    }
}

macro_rules! seq_impls {
    ($($trait:ident :: $method:ident),*) => {$(
        impl<W: Write> ser::$trait for Seq<'_, W> {
            type Ok = ();
            type Error = Error;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
                self.element(value)
            }
            fn end(self) -> Result<(), Error> {
                self.close()
            }
        }
    )*};
}
seq_impls!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// An object being collected: members' values are written into one scratch buffer and sorted by
/// key at the end.
struct Object<'a, W> {
    out: &'a mut W,
    /// `{"variant":` wrapper of a struct variant.
    variant: Option<&'static str>,
    scratch: Vec<u8>,
    /// (key, start and end of the value in `scratch`)
    members: Vec<(std::borrow::Cow<'static, str>, usize, usize)>,
    /// A map key waiting for its value.
    pending_key: Option<String>,
}

impl<'a, W: Write> Object<'a, W> {
    fn new(out: &'a mut W, len: usize, variant: Option<&'static str>) -> Self {
        Object {
            out,
            variant,
            scratch: Vec::with_capacity(len * 16),
            members: Vec::with_capacity(len),
            pending_key: None,
        }
    }

    fn member<T: Serialize + ?Sized>(
        &mut self,
        key: std::borrow::Cow<'static, str>,
        value: &T,
    ) -> Result<(), Error> {
        let start = self.scratch.len();
        value.serialize(Canonical {
            out: &mut self.scratch,
        })?;
        self.members.push((key, start, self.scratch.len()));
        Ok(())
    }

    fn finish(mut self) -> Result<(), Error> {
        // Stable sort: members with equal keys (a `flatten` collision) keep their order.
        self.members
            .sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        if let Some(variant) = self.variant {
            self.out.write_all(b"{").map_err(io)?;
            plain(self.out, variant)?;
            self.out.write_all(b":").map_err(io)?;
        }
        self.out.write_all(b"{").map_err(io)?;
        for (i, (key, start, end)) in self.members.iter().enumerate() {
            if i > 0 {
                self.out.write_all(b",").map_err(io)?;
            }
            plain(self.out, &**key)?;
            self.out.write_all(b":").map_err(io)?;
            self.out
                .write_all(&self.scratch[*start..*end])
                .map_err(io)?;
        }
        self.out
            .write_all(if self.variant.is_some() { b"}}" } else { b"}" })
            .map_err(io)
    }
}

/// A struct and a struct variant are both written as an object of their fields (`finish` also
/// closes a variant's wrapping object): one impl serves both traits.
macro_rules! struct_fields_as_members {
    ($($serialize:ident),+) => {$(
        impl<W: Write> ser::$serialize for Object<'_, W> {
            type Ok = ();
            type Error = Error;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), Error> {
                self.member(std::borrow::Cow::Borrowed(key), value)
            }
            fn end(self) -> Result<(), Error> {
                self.finish()
            }
        }
    )+};
}

struct_fields_as_members!(SerializeStruct, SerializeStructVariant);

impl<W: Write> ser::SerializeMap for Object<'_, W> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        self.pending_key = Some(key.serialize(MapKey)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let key = self
            .pending_key
            .take()
            .ok_or_else(|| ser::Error::custom("map value without a key"))?;
        self.member(std::borrow::Cow::Owned(key), value)
    }
    fn end(self) -> Result<(), Error> {
        self.finish()
    }
}

/// Turns a map key into the string serde_json would use for it.
struct MapKey;

fn key_must_be_a_string() -> Error {
    ser::Error::custom("key must be a string")
}

macro_rules! display_key {
    ($($method:ident: $t:ty),*) => {$(
        fn $method(self, v: $t) -> Result<String, Error> {
            Ok(v.to_string())
        }
    )*};
}

impl ser::Serializer for MapKey {
    type Ok = String;
    type Error = Error;
    type SerializeSeq = Impossible<String, Error>;
    type SerializeTuple = Impossible<String, Error>;
    type SerializeTupleStruct = Impossible<String, Error>;
    type SerializeTupleVariant = Impossible<String, Error>;
    type SerializeMap = Impossible<String, Error>;
    type SerializeStruct = Impossible<String, Error>;
    type SerializeStructVariant = Impossible<String, Error>;

    display_key!(serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_i128: i128, serialize_u8: u8, serialize_u16: u16,
        serialize_u32: u32, serialize_u64: u64, serialize_u128: u128, serialize_char: char);

    fn serialize_f32(self, v: f32) -> Result<String, Error> {
        if v.is_finite() {
            Ok(v.to_string())
        } else {
            Err(ser::Error::custom("float key must be finite"))
        }
    }
    fn serialize_f64(self, v: f64) -> Result<String, Error> {
        if v.is_finite() {
            Ok(v.to_string())
        } else {
            Err(ser::Error::custom("float key must be finite"))
        }
    }
    fn serialize_str(self, v: &str) -> Result<String, Error> {
        Ok(v.to_owned())
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_none(self) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit(self) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<String, Error> {
        Ok(variant.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<String, Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<String, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Error> {
        Err(key_must_be_a_string())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        Err(key_must_be_a_string())
    }
}

#[cfg(test)]
mod tests;
