//! safetensors files read and written one tensor at a time, so that loading or saving a model,
//! a checkpoint or an optimizer's state never holds a second copy of all of it.
//!
//! Reading: the header is checked through a read-only map (the `safetensors` crate validates
//! every tensor's offsets against the file's length), then each tensor's bytes are read with
//! `read_exact_at` when asked for; a map keeps every page read through it in the process's
//! memory until it is dropped, and `candle_core::safetensors::load` builds every tensor at once
//! (loading SmolLM2-135M either way held its 0.54 GB file beside the 0.54 GB of tensors).
//! Writing: each tensor is converted to bytes when the writer reaches it, not before.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor, Var};

use crate::{Error, Result};

/// One tensor's place in a safetensors file.
struct Entry {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte offset in the file and length.
    offset: usize,
    len: usize,
}

/// A safetensors file opened for reading tensor by tensor.
pub struct TensorFile {
    path: PathBuf,
    file: std::fs::File,
    /// In file order.
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

impl TensorFile {
    /// Open `path` and check its header. Errors name the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        // SAFETY: the file is mapped read-only, this process does not modify it, and only its
        // header is read through the map (dropped before any tensor is read); another process
        // truncating it meanwhile would fault the read (accepted, as for any mapped model file).
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::file(path, format!("cannot map: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
        let mut entries: Vec<Entry> = st
            .tensors()
            .into_iter()
            .map(|(name, v)| Entry {
                offset: v.data().as_ptr() as usize - mmap.as_ptr() as usize,
                len: v.data().len(),
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                name,
            })
            .collect();
        // File order; zero-size tensors may share an offset, so the name breaks ties.
        entries.sort_by(|a, b| (a.offset, &a.name).cmp(&(b.offset, &b.name)));
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            entries,
            by_name,
        })
    }

    /// The tensors' names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// The tensor `name` loaded onto `device`, or `None` when the file has no such tensor.
    pub fn get(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        match self.by_name.get(name) {
            None => Ok(None),
            Some(&i) => {
                let mut buf = Vec::new();
                self.load(&self.entries[i], &mut buf, device).map(Some)
            }
        }
    }

    /// `f(name, stored dtype, tensor)` for each tensor `wanted` accepts, in file order, each
    /// read into one buffer reused from tensor to tensor.
    pub fn for_each(
        &self,
        device: &Device,
        wanted: impl Fn(&str) -> bool,
        mut f: impl FnMut(String, safetensors::Dtype, Tensor) -> Result<()>,
    ) -> Result<()> {
        let mut buf = Vec::new();
        for e in self.entries.iter().filter(|e| wanted(&e.name)) {
            let t = self.load(e, &mut buf, device)?;
            f(e.name.clone(), e.dtype, t)?;
        }
        Ok(())
    }

    fn load(&self, e: &Entry, buf: &mut Vec<u8>, device: &Device) -> Result<Tensor> {
        if buf.len() < e.len {
            buf.resize(e.len, 0);
        }
        let bytes = &mut buf[..e.len];
        let fail = |msg: String| Error::tensor(&self.path, &e.name, msg);
        self.file
            .read_exact_at(bytes, e.offset as u64)
            .map_err(|err| fail(format!("cannot read: {err}")))?;
        safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), bytes)
            .map_err(|err| err.to_string())
            .and_then(|v| v.load(device).map_err(|err| err.to_string()))
            .map_err(|err| fail(format!("cannot load: {err}")))
    }

    /// Set every variable of `vars` from this file's tensor `key(name)` (`what` names the file
    /// in errors: "the checkpoint", "the adapter"), converted to the variable's dtype. An error
    /// names the file and the tensor missing or of another shape; variables set before it keep
    /// their new values.
    pub fn set_vars<'a>(
        &self,
        vars: impl IntoIterator<Item = (&'a String, &'a Var)>,
        key: impl Fn(&str) -> String,
        what: &str,
    ) -> Result<()> {
        let mut buf = Vec::new();
        for (name, var) in vars {
            let k = key(name);
            let Some(&i) = self.by_name.get(&k) else {
                return Err(Error::tensor(
                    &self.path,
                    &k,
                    format!("missing from {what}"),
                ));
            };
            let e = &self.entries[i];
            if e.shape != var.dims() {
                return Err(Error::tensor(
                    &self.path,
                    &k,
                    format!(
                        "shape {:?} in {what}, but the model's `{name}` is {:?}",
                        e.shape,
                        var.dims()
                    ),
                ));
            }
            let t = self.load(e, &mut buf, var.device())?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// Every tensor of a safetensors file: `f(name, tensor)` for each, loaded onto `device`.
/// Errors name the file, and the tensor when one fails to load.
pub fn for_each_safetensor(
    path: &Path,
    device: &Device,
    mut f: impl FnMut(String, Tensor) -> Result<()>,
) -> Result<()> {
    TensorFile::open(path)?.for_each(device, |_| true, |name, _, t| f(name, t))
}

/// Write `tensors` as one f32 safetensors file (with `format: pt` metadata, which
/// `transformers` expects), atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    save_safetensors_as(path, tensors, DType::F32)
}

/// [`save_safetensors`] storing every tensor as `store` (f32, bf16 or f16).
pub fn save_safetensors_as(path: &Path, tensors: &[(String, Tensor)], store: DType) -> Result<()> {
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    write_safetensors(path, &shapes, store, |i| Ok(tensors[i].1.clone()))
}

/// Write a safetensors file of the tensors named and shaped by `shapes`, stored as `store`
/// (f32, bf16 or f16), atomically: `tensor(i)` gives the `i`th when the writer reaches it and
/// its bytes are dropped once written, so the file's contents never exist in memory at once
/// (an optimizer's moments can be handed over one at a time; the writer asks for them in its own
/// order, by dtype and name, each once). An error in `tensor` or in converting its result, or a
/// tensor of another shape than declared, fails the write naming the tensor; the file is then
/// left as it was. Written as [`crate::util::io::write_atomic_via`] writes (synced, then renamed
/// into place).
pub fn write_safetensors(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    store: DType,
    tensor: impl Fn(usize) -> Result<Tensor>,
) -> Result<()> {
    let dtype = match store {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        other => {
            return Err(Error::file(
                path,
                format!("cannot store tensors as {}", other.as_str()),
            ))
        }
    };
    let writer = LazyWriter {
        path,
        shapes,
        store,
        tensor: &tensor,
        error: RefCell::new(None),
    };
    let views: Vec<LazyView> = (0..shapes.len())
        .map(|index| LazyView {
            index,
            dtype,
            writer: &writer,
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let names = shapes.iter().map(|(n, _)| n.as_str());
    crate::util::io::write_atomic_via(path, |tmp| {
        let written = safetensors::serialize_to_file(names.zip(&views), Some(meta), tmp);
        // A tensor's error first: what the writer reports after it is a consequence.
        if let Some(e) = writer.error.take() {
            return Err(e);
        }
        written.map_err(|e| Error::file(path, format!("cannot write: {e}")))?;
        // The safetensors writer creates the file owner-only; model files are meant to be shared.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644));
        Ok(())
    })
}

/// What [`write_safetensors`]' views share: where the tensors come from, and the first error.
struct LazyWriter<'a> {
    path: &'a Path,
    shapes: &'a [(String, Vec<usize>)],
    store: DType,
    tensor: &'a dyn Fn(usize) -> Result<Tensor>,
    /// `View::data` cannot fail: the first error is kept here and fails the write after it.
    error: RefCell<Option<Error>>,
}

impl LazyWriter<'_> {
    /// The `i`th tensor's bytes, little-endian, in the stored dtype; an error names the file and
    /// the tensor.
    fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        let (name, shape) = &self.shapes[i];
        let convert = || -> Result<Vec<u8>> {
            let t = (self.tensor)(i)?;
            if t.dims() != shape.as_slice() {
                return Err(Error::msg(format!(
                    "shape {:?}, declared {shape:?}",
                    t.dims()
                )));
            }
            let flat = t.flatten_all()?.to_dtype(self.store)?;
            Ok(match self.store {
                DType::BF16 => le_bytes(&flat.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
                DType::F16 => le_bytes(&flat.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
                _ => le_bytes(&flat.to_vec1::<f32>()?, f32::to_le_bytes),
            })
        };
        convert().map_err(|e| Error::tensor(self.path, name, e.to_string()))
    }
}

fn le_bytes<T: Copy, const N: usize>(xs: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    xs.iter().flat_map(|&x| f(x)).collect()
}

/// One tensor of [`write_safetensors`], converted when the writer asks for its bytes.
struct LazyView<'a> {
    index: usize,
    dtype: safetensors::Dtype,
    writer: &'a LazyWriter<'a>,
}

impl safetensors::View for &LazyView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.writer.shapes[self.index].1
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let w = self.writer;
        if w.error.borrow().is_none() {
            match w.bytes(self.index) {
                Ok(b) => return Cow::Owned(b),
                Err(e) => *w.error.borrow_mut() = Some(e),
            }
        }
        // After an error: nothing more is converted or written (the writer sized the file
        // from the header and does not check what it is given); the file is removed, not
        // renamed into place.
        Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        self.shape().iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Tensor)> {
        let dev = Device::Cpu;
        vec![
            (
                "b.weight".into(),
                Tensor::arange(0f32, 6.0, &dev)
                    .unwrap()
                    .reshape((2, 3))
                    .unwrap(),
            ),
            (
                "a.bias".into(),
                Tensor::new(&[1.5f32, -2.25], &dev).unwrap(),
            ),
            (
                "empty".into(),
                Tensor::zeros((0, 4), DType::F32, &dev).unwrap(),
            ),
        ]
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn shapes(ts: &[(String, Tensor)]) -> Vec<(String, Vec<usize>)> {
        ts.iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect()
    }

    /// `f.set_vars` on one variable named `name`, read from the tensor `key`; the error as text.
    fn set_one(
        f: &TensorFile,
        name: &str,
        var: &Var,
        key: &str,
    ) -> std::result::Result<(), String> {
        let vars = [(name.to_string(), var.clone())];
        f.set_vars(
            vars.iter().map(|(n, v)| (n, v)),
            |n| format!("{key}.{n}"),
            "the file",
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn written_lazily_reads_back_as_candle_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let ts = tensors();
        save_safetensors(&path, &ts).unwrap();
        // The reference reader (candle's, all at once) and ours (one at a time) agree.
        let all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let f = TensorFile::open(&path).unwrap();
        assert_eq!(f.names().count(), 3);
        for (name, t) in &ts {
            let ours = f.get(name, &Device::Cpu).unwrap().unwrap();
            assert_eq!(ours.dims(), t.dims(), "{name}");
            assert_eq!(values(&ours), values(t), "{name}");
            assert_eq!(values(&all[name]), values(t), "{name}");
        }
        assert!(f.get("nope", &Device::Cpu).unwrap().is_none());
        // Stored as bf16: the values read back are the bf16 roundings.
        save_safetensors_as(&path, &ts[..2], DType::BF16).unwrap();
        let f = TensorFile::open(&path).unwrap();
        let b = f.get("a.bias", &Device::Cpu).unwrap().unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        assert_eq!(values(&b), vec![1.5, -2.25]);
    }

    #[test]
    fn each_tensor_is_made_once_while_the_file_is_being_written() {
        // Laziness rests on the safetensors writer asking each view for its bytes only while it
        // writes the file (0.8's `serialize_to_file`); a writer that collected every tensor's
        // bytes before opening the file would hold the whole file in memory again.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let ts = tensors();
        let calls = RefCell::new(vec![]);
        write_safetensors(&path, &shapes(&ts), DType::F32, |i| {
            let files = std::fs::read_dir(dir.path()).unwrap().count();
            calls.borrow_mut().push((i, files));
            Ok(ts[i].1.clone())
        })
        .unwrap();
        let mut calls = calls.into_inner();
        calls.sort();
        // Each tensor once, each with the temporary file already there.
        assert_eq!(calls, vec![(0, 1), (1, 1), (2, 1)]);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["t.safetensors"]);
    }

    #[test]
    fn a_failing_tensor_fails_the_write_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let ts = tensors();
        save_safetensors(&path, &ts).unwrap();
        let before = std::fs::read(&path).unwrap();
        // The second tensor cannot be made.
        let e = write_safetensors(&path, &shapes(&ts), DType::F32, |i| {
            if i == 1 {
                Err(Error::msg("no moments"))
            } else {
                Ok(ts[i].1.clone())
            }
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("no moments") && e.contains("a.bias"), "{e}");
        // A tensor of another shape than declared.
        let e = write_safetensors(&path, &shapes(&ts), DType::F32, |i| {
            Ok(ts[if i == 0 { 1 } else { i }].1.clone())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("b.weight") && e.contains("declared"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // Only the old file is left: no temporary file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn set_vars_names_the_missing_and_the_misshapen_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        save_safetensors(&path, &tensors()).unwrap();
        let f = TensorFile::open(&path).unwrap();
        let dev = Device::Cpu;
        let w = Var::zeros((2, 3), DType::F32, &dev).unwrap();
        set_one(&f, "weight", &w, "b").unwrap();
        assert_eq!(values(w.as_tensor()), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let e = set_one(&f, "weight", &w, "c").unwrap_err();
        assert!(
            e.contains("c.weight") && e.contains("missing from the file"),
            "{e}"
        );
        let bias = Var::zeros(3, DType::F32, &dev).unwrap();
        let e = set_one(&f, "bias", &bias, "a").unwrap_err();
        assert!(
            e.contains("a.bias") && e.contains("[2]") && e.contains("[3]"),
            "{e}"
        );
        // A file stored in another dtype than the variables' is converted to theirs.
        save_safetensors_as(&path, &tensors(), DType::BF16).unwrap();
        let f = TensorFile::open(&path).unwrap();
        let w = Var::zeros((2, 3), DType::F32, &dev).unwrap();
        set_one(&f, "weight", &w, "b").unwrap();
        assert_eq!(w.dtype(), DType::F32);
        assert_eq!(values(w.as_tensor()), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }
}
