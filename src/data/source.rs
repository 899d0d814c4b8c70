//! Low-level reading shared by every dataset reader: file formats, record locations for error
//! messages, JSON / JSONL / CSV / TSV / Parquet record sources, and typed field access that names
//! the file, line and field when a value is missing or has the wrong type.
//!
//! Conventions: lines, records and rows are numbered from 1; whitespace-only lines of a JSONL or
//! text file are not records; a UTF-8 byte-order mark at the start of a file is ignored.

use std::fmt;
use std::fs::File;
use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// The container format of a data file, chosen by its extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// `.json`: one JSON value (an array of records, or an object).
    Json,
    /// `.jsonl` / `.ndjson`: one JSON object per line.
    Jsonl,
    /// `.csv`: comma-separated values.
    Csv,
    /// `.tsv`: tab-separated values, no quoting.
    Tsv,
    /// `.parquet`.
    Parquet,
    /// `.txt`: one record per line.
    Text,
    /// `.xml`.
    Xml,
}

impl FileFormat {
    /// The format named by `path`'s extension (case-insensitive).
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "json" => Ok(Self::Json),
            "jsonl" | "ndjson" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            "tsv" => Ok(Self::Tsv),
            "parquet" => Ok(Self::Parquet),
            "txt" => Ok(Self::Text),
            "xml" => Ok(Self::Xml),
            _ => Err(Error::file(
                path,
                format!(
                    "unknown data file extension `{ext}`; expected one of .json, .jsonl, \
                     .ndjson, .csv, .tsv, .parquet, .txt, .xml"
                ),
            )),
        }
    }
}

/// Where a record sits in its file: `line N` (JSONL, CSV, text), `record N` (the N-th element of
/// a JSON array) or `row N` (Parquet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Line(usize),
    Record(usize),
    Row(usize),
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Line(n) => write!(f, "line {n}"),
            At::Record(n) => write!(f, "record {n}"),
            At::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// A record's location, used to build errors that name the file, the location and the field.
#[derive(Clone, Copy, Debug)]
pub struct Loc<'a> {
    pub path: &'a Path,
    pub at: At,
}

impl<'a> Loc<'a> {
    pub fn new(path: &'a Path, at: At) -> Self {
        Self { path, at }
    }

    /// An error about `field` of this record.
    pub fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::field(self.path, format!("{}: {field}", self.at), msg)
    }
}

/// Read a whole file as UTF-8 text, without a leading byte-order mark.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        Error::file(
            path,
            format!("not valid UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        )
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// An error for a file that holds no records.
pub fn empty(path: &Path) -> Error {
    Error::file(path, "the file holds no records")
}

/// The 1-based line number of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The JSON type name of a value, for messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Every non-blank line of a JSONL file parsed as JSON, with its line number.
pub fn jsonl_values(path: &Path) -> Result<Vec<(At, Value)>> {
    let text = read_text(path)?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| {
            Error::field(
                path,
                format!("line {}", i + 1),
                format!("invalid JSON: {e}"),
            )
        })?;
        out.push((At::Line(i + 1), v));
    }
    Ok(out)
}

/// A whole `.json` file parsed as one value.
pub fn json_value(path: &Path) -> Result<Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| {
        Error::field(
            path,
            format!("line {}", e.line()),
            format!("invalid JSON: {e}"),
        )
    })
}

/// The elements of a `.json` file that holds one array, numbered as records.
pub fn json_array(path: &Path) -> Result<Vec<(At, Value)>> {
    match json_value(path)? {
        Value::Array(items) => Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (At::Record(i + 1), v))
            .collect()),
        other => Err(Error::file(
            path,
            format!(
                "expected a JSON array of records, found {}",
                type_name(&other)
            ),
        )),
    }
}

/// Records of a JSON array, JSONL or Parquet file as JSON values (Parquet rows are converted:
/// structs and maps become objects, lists become arrays).
pub fn json_records(path: &Path) -> Result<Vec<(At, Value)>> {
    match FileFormat::from_path(path)? {
        FileFormat::Json => json_array(path),
        FileFormat::Jsonl => jsonl_values(path),
        FileFormat::Parquet => parquet_values(path),
        other => Err(Error::file(
            path,
            format!("expected a .json, .jsonl or .parquet file, not {other:?}"),
        )),
    }
}

/// Every row of a Parquet file as a JSON object keyed by column name.
pub fn parquet_values(path: &Path) -> Result<Vec<(At, Value)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
    let file_len = file
        .metadata()
        .map_err(|e| Error::file(path, format!("cannot read: {e}")))?
        .len();
    let reader = SerializedFileReader::new(file)
        .map_err(|e| Error::file(path, format!("not a readable Parquet file: {e}")))?;
    check_parquet_chunks(reader.metadata(), file_len, path)?;
    let read = || -> Result<Vec<(At, Value)>> {
        let rows = reader
            .get_row_iter(None)
            .map_err(|e| Error::file(path, format!("cannot read Parquet rows: {e}")))?;
        let mut out = vec![];
        for (i, row) in rows.enumerate() {
            let row =
                row.map_err(|e| Error::field(path, format!("row {}", i + 1), e.to_string()))?;
            out.push((At::Row(i + 1), parquet_row_to_json(&row)));
        }
        Ok(out)
    };
    // The parquet crate still panics on some malformed pages (libFuzzer found `Decoder for dict
    // should have been set`): a panic while decoding becomes this file's error, silently.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    std::panic::set_hook(hook);
    result.unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Error::file(
            path,
            format!("not a readable Parquet file: its pages are malformed ({why})"),
        ))
    })
}

/// Every column chunk's byte range must lie inside the file: the Parquet reader panics on a
/// negative offset or size (found by `fuzz/`'s dataset target) and would allocate what a size
/// claims.
fn check_parquet_chunks(
    meta: &parquet::file::metadata::ParquetMetaData,
    file_len: u64,
    path: &Path,
) -> Result<()> {
    for (g, rg) in meta.row_groups().iter().enumerate() {
        for c in rg.columns() {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let (start, data, size) = (start, c.data_page_offset(), c.compressed_size());
            let end = u64::try_from(start)
                .ok()
                .zip(u64::try_from(size).ok())
                .filter(|_| data >= 0)
                .and_then(|(s, n)| s.checked_add(n));
            if end.is_none_or(|e| e > file_len) {
                return Err(Error::file(
                    path,
                    format!(
                        "not a readable Parquet file: row group {g}, column {}: bytes {start} \
                         + {size} lie outside the file ({file_len} bytes)",
                        c.column_path()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn parquet_row_to_json(row: &parquet::record::Row) -> Value {
    let mut m = Map::new();
    for (name, field) in row.get_column_iter() {
        m.insert(name.clone(), parquet_field_to_json(field));
    }
    Value::Object(m)
}

fn parquet_field_to_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(x) => Value::from(*x),
        F::Short(x) => Value::from(*x),
        F::Int(x) => Value::from(*x),
        F::Long(x) => Value::from(*x),
        F::UByte(x) => Value::from(*x),
        F::UShort(x) => Value::from(*x),
        F::UInt(x) => Value::from(*x),
        F::ULong(x) => Value::from(*x),
        F::Float16(x) => Value::from(f32::from(*x) as f64),
        F::Float(x) => Value::from(*x as f64),
        F::Double(x) => Value::from(*x),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Null,
        },
        F::Group(row) => parquet_row_to_json(row),
        F::ListInternal(list) => {
            Value::Array(list.elements().iter().map(parquet_field_to_json).collect())
        }
        F::MapInternal(map) => {
            let mut m = Map::new();
            for (k, v) in map.entries() {
                let key = match k {
                    F::Str(s) => s.clone(),
                    other => other.to_string(),
                };
                m.insert(key, parquet_field_to_json(v));
            }
            Value::Object(m)
        }
        other => Value::String(other.to_string()),
    }
}

/// A parsed CSV / TSV table: its header (if it has one) and its rows with their line numbers.
#[derive(Clone, Debug)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<(At, Vec<String>)>,
}

/// How to read a delimited file.
#[derive(Clone, Copy, Debug)]
pub struct TableSpec {
    pub delimiter: u8,
    pub has_headers: bool,
    /// Honour `"` quoting (CSV); TSV files such as TreeNLG's are read without quoting.
    pub quoting: bool,
}

impl TableSpec {
    pub const CSV: Self = Self {
        delimiter: b',',
        has_headers: true,
        quoting: true,
    };
    pub const CSV_NO_HEADER: Self = Self {
        delimiter: b',',
        has_headers: false,
        quoting: true,
    };
    pub const TSV_NO_HEADER: Self = Self {
        delimiter: b'\t',
        has_headers: false,
        quoting: false,
    };
}

/// Read a delimited file. Every row must have as many fields as the first row (or header);
/// a row that does not is an error naming its line.
pub fn read_table(path: &Path, spec: TableSpec) -> Result<Table> {
    let text = read_text(path)?;
    parse_table(path, &text, spec)
}

/// [`read_table`] on text already in memory (`path` is only used in messages).
pub fn parse_table(path: &Path, text: &str, spec: TableSpec) -> Result<Table> {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(spec.delimiter)
        .has_headers(spec.has_headers)
        .quoting(spec.quoting)
        .flexible(false)
        .from_reader(text.as_bytes());
    let csv_err = |e: csv::Error| -> Error {
        let line = e.position().map(|p| p.line() as usize);
        let msg = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!("expected {expected_len} fields, found {len}"),
            _ => e.to_string(),
        };
        match line {
            Some(l) => Error::field(path, format!("line {l}"), msg),
            None => Error::file(path, msg),
        }
    };
    let headers = if spec.has_headers {
        rdr.headers()
            .map_err(csv_err)?
            .iter()
            .map(|h| h.trim().to_string())
            .collect()
    } else {
        vec![]
    };
    let mut rows = vec![];
    for rec in rdr.records() {
        let rec = rec.map_err(csv_err)?;
        let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        // A line holding only whitespace in a one-column file is not a record.
        if rec.len() == 1 && rec[0].trim().is_empty() {
            continue;
        }
        rows.push((At::Line(line), rec.iter().map(String::from).collect()));
    }
    Ok(Table { headers, rows })
}

impl Table {
    /// The index of each named column; a missing one is an error that lists the columns found.
    pub fn columns<const N: usize>(&self, path: &Path, names: [&str; N]) -> Result<[usize; N]> {
        let mut out = [0; N];
        for (slot, name) in out.iter_mut().zip(names) {
            *slot = self.required(path, name)?;
        }
        Ok(out)
    }

    /// The index of a column that must be present.
    pub fn required(&self, path: &Path, name: &str) -> Result<usize> {
        self.column(name).ok_or_else(|| {
            Error::field(
                path,
                name,
                format!(
                    "missing column (the header has: {})",
                    self.headers.join(", ")
                ),
            )
        })
    }

    /// The index of a column, if the header has it.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.headers.iter().position(|h| h == name)
    }

    /// The index of the first of `names` the header has.
    pub fn column_any(&self, names: &[&str]) -> Option<usize> {
        names.iter().find_map(|n| self.column(n))
    }
}

/// A non-empty text field of a table row.
pub fn cell_text(row: &[String], idx: usize, loc: &Loc, field: &str) -> Result<String> {
    let v = row.get(idx).map(String::as_str).unwrap_or("");
    if v.trim().is_empty() {
        return Err(loc.err(field, "is empty"));
    }
    Ok(v.to_string())
}

/// A 0/1 (or true/false) field of a table row.
pub fn cell_bool(row: &[String], idx: usize, loc: &Loc, field: &str) -> Result<bool> {
    let v = row.get(idx).map(String::as_str).unwrap_or("").trim();
    parse_bool_str(v)
        .ok_or_else(|| loc.err(field, format!("expected 0/1 or true/false, found `{v}`")))
}

/// `0`/`1`/`true`/`false` (any case) as a boolean.
pub fn parse_bool_str(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// A JSON record as an object.
pub fn as_object<'v>(v: &'v Value, loc: &Loc) -> Result<&'v Map<String, Value>> {
    v.as_object().ok_or_else(|| {
        loc.err(
            "(record)",
            format!("expected a JSON object, found {}", type_name(v)),
        )
    })
}

/// A required string field (may be empty).
pub fn get_str(o: &Map<String, Value>, key: &str, loc: &Loc) -> Result<String> {
    match o.get(key) {
        None => Err(loc.err(key, "missing")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(loc.err(key, format!("expected a string, found {}", type_name(v)))),
    }
}

/// A required string field that must hold some non-whitespace text.
pub fn get_text(o: &Map<String, Value>, key: &str, loc: &Loc) -> Result<String> {
    let s = get_str(o, key, loc)?;
    if s.trim().is_empty() {
        return Err(loc.err(key, "is empty"));
    }
    Ok(s)
}

/// An optional string field (`null` and absent are `None`).
pub fn opt_str(o: &Map<String, Value>, key: &str, loc: &Loc) -> Result<Option<String>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(loc.err(key, format!("expected a string, found {}", type_name(v)))),
    }
}

/// A required boolean field (a JSON boolean, or the integers 0 and 1).
pub fn get_bool(o: &Map<String, Value>, key: &str, loc: &Loc) -> Result<bool> {
    match o.get(key) {
        None => Err(loc.err(key, "missing")),
        Some(v) => value_bool(v)
            .ok_or_else(|| loc.err(key, format!("expected a boolean, found {}", type_name(v)))),
    }
}

/// A JSON boolean, or the integers 0 and 1.
pub fn value_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_u64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        _ => None,
    }
}

/// A required non-negative integer field.
pub fn get_usize(o: &Map<String, Value>, key: &str, loc: &Loc) -> Result<usize> {
    match o.get(key) {
        None => Err(loc.err(key, "missing")),
        Some(v) => v
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| loc.err(key, format!("expected a non-negative integer, found {v}"))),
    }
}

/// An optional number field (`null` and absent are `None`).
pub fn opt_f64(o: &Map<String, Value>, key: &str, loc: &Loc) -> Result<Option<f64>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| loc.err(key, format!("expected a number, found {}", type_name(v)))),
    }
}

/// A required array of strings.
pub fn get_str_list(o: &Map<String, Value>, key: &str, loc: &Loc) -> Result<Vec<String>> {
    match o.get(key) {
        None => Err(loc.err(key, "missing")),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(loc.err(
                    &format!("{key}[{i}]"),
                    format!("expected a string, found {}", type_name(other)),
                )),
            })
            .collect(),
        Some(v) => Err(loc.err(key, format!("expected an array, found {}", type_name(v)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_extension() {
        assert_eq!(
            FileFormat::from_path(Path::new("a/b.JSONL")).unwrap(),
            FileFormat::Jsonl
        );
        assert_eq!(
            FileFormat::from_path(Path::new("x.parquet")).unwrap(),
            FileFormat::Parquet
        );
        let e = FileFormat::from_path(Path::new("x.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.yaml") && e.contains("yaml"), "{e}");
    }

    #[test]
    fn line_numbers_from_offsets() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }

    #[test]
    fn field_errors_name_location_and_field() {
        let p = Path::new("f.jsonl");
        let loc = Loc::new(p, At::Line(7));
        let v: Value = serde_json::json!({"a": 3, "b": "", "c": null});
        let o = v.as_object().unwrap();
        let e = get_str(o, "a", &loc).unwrap_err().to_string();
        assert!(
            e.contains("f.jsonl") && e.contains("line 7: a") && e.contains("number"),
            "{e}"
        );
        assert!(get_text(o, "b", &loc)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(get_str(o, "z", &loc)
            .unwrap_err()
            .to_string()
            .contains("missing"));
        assert_eq!(opt_str(o, "c", &loc).unwrap(), None);
        assert!(get_bool(o, "a", &loc).is_err());
    }

    #[test]
    fn tables_report_short_rows_and_missing_columns() {
        let p = Path::new("t.csv");
        let t = parse_table(p, "a,b\n1,2\n3\n", TableSpec::CSV)
            .unwrap_err()
            .to_string();
        assert!(
            t.contains("line 3") && t.contains("expected 2 fields"),
            "{t}"
        );
        let t = parse_table(p, "a,b\n1,2\n", TableSpec::CSV).unwrap();
        let e = t.columns(p, ["a", "c"]).unwrap_err().to_string();
        assert!(e.contains("`c`") && e.contains("a, b"), "{e}");
        assert_eq!(t.columns(p, ["b", "a"]).unwrap(), [1, 0]);
        assert_eq!(t.rows[0].0, At::Line(2));
    }

    #[test]
    fn bools_from_strings() {
        assert_eq!(parse_bool_str(" True"), Some(true));
        assert_eq!(parse_bool_str("0"), Some(false));
        assert_eq!(parse_bool_str("yes"), None);
    }
}
