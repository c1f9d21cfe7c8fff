//! A read-only scan of a `torch.save` pickle (`data.pkl`) that lists every tensor's storage
//! reference, offset, size and stride, without building any Python object.
//!
//! burn-store's reader ignores strides and turns unreadable or short storages into zeros, so
//! [`crate::tensor_file`] uses this scan to refuse such files instead of returning wrong
//! weights. The scan understands the opcodes `torch.save` emits (protocols 2-4); on anything
//! else it gives up (returns `None`) and the file is read unverified. Nothing is executed:
//! globals are only recorded as names.

use std::collections::HashMap;

/// Where a tensor's data lives: the persistent id `('storage', Class, key, location, numel)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    /// Storage class name, e.g. `FloatStorage`.
    pub class: String,
    /// Storage key: the member `data/<key>` of the zip archive.
    pub key: String,
    /// Number of elements in the storage.
    pub numel: u64,
}

/// One `_rebuild_tensor_v2(storage, offset, size, stride, ...)` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    /// Innermost dict key the tensor was stored under, if any.
    pub name: Option<String>,
    pub storage: StorageRef,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.size.iter().product()
    }

    /// Row-major contiguous (strides of size-1 dims do not matter, as in PyTorch).
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut expected = 1u64;
        for (&n, &s) in self.size.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(n);
        }
        self.size.len() == self.stride.len()
    }
}

/// Bytes per element of a PyTorch storage class, if known.
pub(crate) fn storage_element_size(class: &str) -> Option<u64> {
    Some(match class {
        "DoubleStorage" | "LongStorage" | "ComplexFloatStorage" => 8,
        "FloatStorage" | "IntStorage" => 4,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "ByteStorage" | "CharStorage" | "BoolStorage" => 1,
        _ => return None,
    })
}

#[derive(Debug, Clone)]
enum Value {
    Mark,
    Int(i64),
    Str(String),
    Global(String, String),
    Tuple(Vec<Value>),
    PersId(Box<Value>),
    /// Index into the list of tensors found.
    Tensor(usize),
    Other,
}

struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.data.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> Option<String> {
        let rest = self.data.get(self.pos..)?;
        let n = rest.iter().position(|&b| b == b'\n')?;
        let s = std::str::from_utf8(&rest[..n]).ok()?.to_string();
        self.pos += n + 1;
        Some(s)
    }
    fn string(&mut self, n: usize) -> Option<Value> {
        let b = self.take(n)?;
        Some(Value::Str(String::from_utf8_lossy(b).into_owned()))
    }
}

/// Pops everything above the topmost mark (and the mark).
fn pop_mark(stack: &mut Vec<Value>) -> Option<Vec<Value>> {
    let at = stack.iter().rposition(|v| matches!(v, Value::Mark))?;
    let items = stack.split_off(at + 1);
    stack.pop();
    Some(items)
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

fn as_dims(v: &Value) -> Option<Vec<u64>> {
    match v {
        Value::Tuple(items) => items.iter().map(as_u64).collect(),
        _ => None,
    }
}

/// Interprets a call; `None` when a tensor-rebuilding call has arguments it cannot read.
fn call(callable: &Value, args: Value, tensors: &mut Vec<TensorRef>) -> Option<Value> {
    let Value::Global(module, name) = callable else {
        return Some(Value::Other);
    };
    let Value::Tuple(args) = args else {
        return Some(Value::Other);
    };
    match (module.as_str(), name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let Value::PersId(pid) = args.first()? else {
                return None;
            };
            let Value::Tuple(pid) = pid.as_ref() else {
                return None;
            };
            let class = match pid.get(1)? {
                Value::Global(_, c) | Value::Str(c) => c.clone(),
                _ => return None,
            };
            let key = match pid.get(2)? {
                Value::Str(k) => k.clone(),
                _ => return None,
            };
            let storage = StorageRef {
                class,
                key,
                numel: as_u64(pid.get(4)?)?,
            };
            tensors.push(TensorRef {
                name: None,
                storage,
                offset: as_u64(args.get(1)?)?,
                size: as_dims(args.get(2)?)?,
                stride: as_dims(args.get(3)?)?,
            });
            Some(Value::Tensor(tensors.len() - 1))
        }
        ("torch._utils", "_rebuild_parameter")
        | ("torch._utils", "_rebuild_parameter_with_state") => Some(args.into_iter().next()?),
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let mut it = args.into_iter();
            let func = it.next()?;
            let _new_type = it.next()?;
            call(&func, it.next()?, tensors)
        }
        _ => Some(Value::Other),
    }
}

/// Records the dict key `k` of a tensor value `v`.
fn name_tensor(k: &Value, v: &Value, tensors: &mut [TensorRef]) {
    if let (Value::Str(k), Value::Tensor(i)) = (k, v) {
        if let Some(t) = tensors.get_mut(*i) {
            t.name = Some(k.clone());
        }
    }
}

/// Lists the tensors of a `torch.save` pickle, or `None` if the pickle uses something the
/// scan does not understand.
pub(crate) fn scan_tensors(pickle: &[u8]) -> Option<Vec<TensorRef>> {
    let mut c = Cursor {
        data: pickle,
        pos: 0,
    };
    let mut stack: Vec<Value> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    let mut tensors: Vec<TensorRef> = Vec::new();
    loop {
        let op = c.u8()?;
        match op {
            0x80 => {
                c.u8()?; // PROTO
            }
            0x95 => {
                c.u64()?; // FRAME
            }
            b'.' => return Some(tensors), // STOP
            b'}' | b']' | b'N' | 0x88 | 0x89 | b'G' | 0x8f => {
                if op == b'G' {
                    c.take(8)?;
                }
                stack.push(Value::Other);
            }
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'(' => stack.push(Value::Mark),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let at = stack.len().checked_sub(n)?;
                let items = stack.split_off(at);
                stack.push(Value::Tuple(items));
            }
            b'd' | b'l' => {
                pop_mark(&mut stack)?;
                stack.push(Value::Other);
            }
            b'q' => {
                let i = u32::from(c.u8()?);
                memo.insert(i, stack.last()?.clone());
            }
            b'r' => {
                let i = c.u32()?;
                memo.insert(i, stack.last()?.clone());
            }
            0x94 => {
                let i = u32::try_from(memo.len()).ok()?;
                memo.insert(i, stack.last()?.clone());
            }
            b'h' => {
                let i = u32::from(c.u8()?);
                stack.push(memo.get(&i)?.clone());
            }
            b'j' => {
                let i = c.u32()?;
                stack.push(memo.get(&i)?.clone());
            }
            b'X' | b'T' | b'B' => {
                let n = c.u32()? as usize;
                let s = c.string(n)?;
                stack.push(s);
            }
            0x8c | b'U' | b'C' => {
                let n = usize::from(c.u8()?);
                let s = c.string(n)?;
                stack.push(s);
            }
            0x8d | 0x8e => {
                let n = usize::try_from(c.u64()?).ok()?;
                let s = c.string(n)?;
                stack.push(s);
            }
            b'c' => {
                let module = c.line()?;
                let name = c.line()?;
                stack.push(Value::Global(module, name));
            }
            0x93 => {
                let name = stack.pop()?;
                let module = stack.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => stack.push(Value::Global(m, n)),
                    _ => return None,
                }
            }
            b'Q' => {
                let pid = stack.pop()?;
                stack.push(Value::PersId(Box::new(pid)));
            }
            b'K' => {
                let v = c.u8()?;
                stack.push(Value::Int(i64::from(v)));
            }
            b'M' => {
                let v = c.u16()?;
                stack.push(Value::Int(i64::from(v)));
            }
            b'J' => {
                let v = c.u32()? as i32;
                stack.push(Value::Int(i64::from(v)));
            }
            0x8a => {
                let n = usize::from(c.u8()?);
                let b = c.take(n)?;
                if n > 8 {
                    stack.push(Value::Other);
                } else {
                    let negative = b.last().is_some_and(|&x| x & 0x80 != 0);
                    let mut a = [if negative { 0xff } else { 0 }; 8];
                    a[..n].copy_from_slice(b);
                    stack.push(Value::Int(i64::from_le_bytes(a)));
                }
            }
            b'R' => {
                let args = stack.pop()?;
                let callable = stack.pop()?;
                let v = call(&callable, args, &mut tensors)?;
                stack.push(v);
            }
            0x81 => {
                // NEWOBJ cls args
                stack.pop()?;
                stack.pop()?;
                stack.push(Value::Other);
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                for pair in items.chunks(2) {
                    if let [k, v] = pair {
                        name_tensor(k, v, &mut tensors);
                    }
                }
            }
            b's' => {
                let v = stack.pop()?;
                let k = stack.pop()?;
                name_tensor(&k, &v, &mut tensors);
            }
            b'a' | b'b' => {
                stack.pop()?; // APPEND item / BUILD state
            }
            b'e' => {
                pop_mark(&mut stack)?;
            }
            b'0' => {
                stack.pop()?;
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            b'2' => {
                let top = stack.last()?.clone();
                stack.push(top);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(size: &[u64], stride: &[u64]) -> TensorRef {
        TensorRef {
            name: None,
            storage: StorageRef {
                class: "FloatStorage".into(),
                key: "0".into(),
                numel: 100,
            },
            offset: 0,
            size: size.to_vec(),
            stride: stride.to_vec(),
        }
    }

    #[test]
    fn contiguity() {
        assert!(t(&[4, 6], &[6, 1]).is_contiguous());
        assert!(!t(&[4, 6], &[1, 4]).is_contiguous());
        assert!(t(&[], &[]).is_contiguous());
        assert!(t(&[1, 6], &[1, 1]).is_contiguous());
        assert!(t(&[0, 6], &[1, 1]).is_contiguous());
        assert!(!t(&[3, 6], &[6]).is_contiguous());
    }

    #[test]
    fn garbage_is_not_understood() {
        assert_eq!(scan_tensors(b""), None);
        assert_eq!(scan_tensors(b"\x80\x02I12\n."), None);
    }
}
