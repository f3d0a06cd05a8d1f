// The key page: check the key against the service (GET /jobs with it as a header), then keep
// it in this tab's sessionStorage and go on to where the visitor was going.
import { ApiError, KEY_HEADERS, api, describe, forgetKey, initChrome, saveKey, showMessage, takeReturnPath } from "./common.js";

const form = document.getElementById("key-form");
const input = document.getElementById("key-value");
const submit = document.getElementById("key-submit");

initChrome();

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const header = form.querySelector("input[name=kind]:checked").value;
  const value = input.value.trim();
  if (!KEY_HEADERS.includes(header) || !value) {
    showMessage("key-error", "Enter a key.");
    return;
  }
  submit.disabled = true;
  showMessage("key-error", "");
  saveKey(header, value);
  try {
    await api("/jobs?per_page=1");
  } catch (error) {
    forgetKey(); // a refused key is not kept
    showMessage("key-error", error instanceof ApiError && error.status === 401
      ? `The service refused this key: ${error.message}` : describe(error));
    submit.disabled = false;
    return;
  }
  input.value = "";
  location.assign(takeReturnPath());
});
