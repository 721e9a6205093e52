//! 4 KiB-aligned owned buffers and a per-queue pool, so steady-state I/O does
//! no heap allocation: buffers are taken from and returned to the pool.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// O_DIRECT needs the logical-block alignment of the device; 4 KiB covers
/// every device we serve.
pub const IOBUF_ALIGN: usize = 4096;

/// An owned, aligned byte buffer with a length (`len <= capacity`).
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for IoBuf {}
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Allocates a zeroed buffer of at least `cap` bytes (rounded up to the
    /// alignment) with length `cap`.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1).next_multiple_of(IOBUF_ALIGN);
        let layout = Layout::from_size_align(cap, IOBUF_ALIGN).expect("iobuf layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len: cap, cap }
    }
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::new(data.len());
        b.set_len(data.len());
        b.copy_from_slice(data);
        b
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Sets the visible length. Bytes past the old length keep whatever the
    /// buffer held before (never uninitialised: allocation zeroes).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "IoBuf::set_len {len} > capacity {}",
            self.cap
        );
        self.len = len;
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, IOBUF_ALIGN),
            )
        }
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf(len={}, cap={})", self.len, self.cap)
    }
}

/// Size classes are powers of two from 4 KiB; a class keeps at most
/// `max_per_class` idle buffers so a burst does not pin memory forever.
pub struct BufPool {
    classes: Vec<Vec<IoBuf>>,
    max_per_class: usize,
    /// Bytes of idle buffers kept; past this a returned buffer is freed.
    max_bytes: usize,
    retained: usize,
    allocations: u64,
}

const MIN_CLASS_SHIFT: u32 = 12;

impl BufPool {
    pub fn new(max_per_class: usize) -> Self {
        Self {
            classes: (0..16).map(|_| Vec::new()).collect(),
            max_per_class,
            max_bytes: usize::MAX,
            retained: 0,
            allocations: 0,
        }
    }
    /// Also bounds the idle bytes kept over all classes.
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }
    /// Frees idle buffers, largest first, until at most `keep` bytes remain.
    pub fn trim(&mut self, keep: usize) {
        for class in self.classes.iter_mut().rev() {
            while self.retained > keep {
                let Some(b) = class.pop() else { break };
                self.retained -= b.capacity();
            }
        }
    }
    /// Idle bytes held for reuse.
    pub fn retained_bytes(&self) -> usize {
        self.retained
    }
    fn class_of(cap: usize) -> usize {
        let shift = cap
            .max(1)
            .next_power_of_two()
            .trailing_zeros()
            .max(MIN_CLASS_SHIFT);
        (shift - MIN_CLASS_SHIFT) as usize
    }
    /// A buffer of length `len`; contents are unspecified (old data).
    pub fn get(&mut self, len: usize) -> IoBuf {
        let class = Self::class_of(len);
        let mut buf = match self.classes.get_mut(class).and_then(Vec::pop) {
            Some(b) => {
                self.retained -= b.capacity();
                b
            }
            None => {
                self.allocations += 1;
                IoBuf::new(1usize << (class as u32 + MIN_CLASS_SHIFT))
            }
        };
        buf.set_len(len);
        buf
    }
    pub fn put(&mut self, buf: IoBuf) {
        let class = Self::class_of(buf.capacity());
        if buf.capacity() == 1 << (class as u32 + MIN_CLASS_SHIFT)
            && let Some(list) = self.classes.get_mut(class)
            && list.len() < self.max_per_class
            && self.retained + buf.capacity() <= self.max_bytes
        {
            self.retained += buf.capacity();
            list.push(buf);
        }
    }
    /// Heap allocations made so far: flat in steady state.
    pub fn allocations(&self) -> u64 {
        self.allocations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iobuf_is_aligned_and_sized() {
        let b = IoBuf::new(5000);
        assert_eq!(b.as_ptr() as usize % IOBUF_ALIGN, 0);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.len(), 8192);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn pool_reuses_buffers_without_allocating() {
        let mut p = BufPool::new(4);
        let a = p.get(4096);
        let b = p.get(1 << 20);
        p.put(a);
        p.put(b);
        for _ in 0..100 {
            let x = p.get(512);
            let y = p.get(1 << 20);
            assert_eq!(y.len(), 1 << 20);
            p.put(x);
            p.put(y);
        }
        assert_eq!(p.allocations(), 2);
    }

    #[test]
    fn pool_bounds_and_trims_idle_bytes() {
        let mut p = BufPool::new(256).with_max_bytes(3 << 20);
        let bufs: Vec<_> = (0..8).map(|_| p.get(1 << 20)).collect();
        for b in bufs {
            p.put(b);
        }
        assert_eq!(p.retained_bytes(), 3 << 20, "capped at max_bytes");
        p.trim(1 << 20);
        assert_eq!(p.retained_bytes(), 1 << 20);
        let small: Vec<_> = (0..4).map(|_| p.get(4096)).collect();
        for b in small {
            p.put(b);
        }
        p.trim(64 << 10);
        assert!(p.retained_bytes() <= 64 << 10, "{}", p.retained_bytes());
        assert_eq!(
            p.retained_bytes(),
            4 * 4096,
            "large buffers are freed first"
        );
    }
}
