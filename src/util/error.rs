//! Typed errors for the library. Every error that comes from user input names the file, field,
//! line or tensor it is about; the binary adds context with `anyhow`.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem with a specific file (model, tokenizer, config, dataset).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    /// A problem with one field of a file.
    #[error("{}: field `{field}`: {msg}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        msg: String,
    },

    /// A tensor that is missing or has the wrong shape.
    #[error("{}: tensor `{name}`: {msg}", path.display())]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },

    /// Invalid user-supplied settings (flags, config values).
    #[error("invalid setting `{name}` = {value}: {msg}")]
    Setting {
        name: String,
        value: String,
        msg: String,
    },

    /// An error from the tensor library, with what we were doing.
    #[error("{context}: {source}")]
    Candle {
        context: String,
        #[source]
        source: candle_core::Error,
    },

    #[error(transparent)]
    CandleRaw(#[from] candle_core::Error),

    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn field(path: impl AsRef<Path>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Field {
            path: path.as_ref().to_path_buf(),
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(path: impl AsRef<Path>, name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            name: name.into(),
            msg: msg.into(),
        }
    }
    pub fn setting(name: impl Into<String>, value: impl ToString, msg: impl Into<String>) -> Self {
        Error::Setting {
            name: name.into(),
            value: value.to_string(),
            msg: msg.into(),
        }
    }
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}

/// A setting that must be a finite number above zero (a learning rate, a threshold, a penalty).
pub fn check_positive(name: &str, value: f64) -> Result<()> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(Error::setting(name, value, "must be a positive number"))
    }
}

/// A count that must be at least 1 (a batch size, a step or token count, a rank).
pub fn check_at_least_one(name: &str, n: usize) -> Result<()> {
    if n >= 1 {
        Ok(())
    } else {
        Err(Error::setting(name, n, "must be at least 1"))
    }
}

/// Attach context to candle errors.
pub trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for std::result::Result<T, candle_core::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: context(),
            source,
        })
    }
}
